"""Blocked, sharded top-k search (largefr.eval.search) on spawned gloo ranks against a plain brute force.

The labelled gallery and the probes have small integer entries, so scores tie exactly and often,
across blocks and across shards; random unit distractors follow them in the same index space.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from largefr.eval.identification import NO_IDENTITY
from largefr.eval.search import (DISTRACTOR_CHUNK_ROWS, ArraySource, ConcatSource, RandomDistractors, SearchError,
                                 block_topk, search_report, sharded_search)
from tests.distributed_helpers import run_distributed
from tests.eval_fixtures import load_tool
from tests.test_eval_identification import brute_candidates, brute_rate_at

K, FARS = 9, (0.2, 0.05, 0.01)


def _case(seed: int = 0, gallery: int = 19, distractors: int = 37, probes: int = 11, dim: int = 5):
    rng = np.random.default_rng(seed)
    gallery_vectors = rng.integers(-1, 2, size=(gallery, dim)).astype(np.float32)
    probe_vectors = rng.integers(-1, 2, size=(probes, dim)).astype(np.float32)
    gallery_labels = rng.integers(0, 6, size=gallery)
    probe_labels = rng.integers(0, 8, size=probes)  # 6, 7: non-mated
    return probe_vectors, probe_labels, gallery_vectors, gallery_labels, distractors, seed


def _source(case) -> ConcatSource:
    _, _, gallery_vectors, gallery_labels, distractors, seed = case
    return ConcatSource([ArraySource(gallery_vectors, gallery_labels),
                         RandomDistractors(distractors, gallery_vectors.shape[1], seed)])


def _search_on_rank(rank: int, world: int, runs: list[tuple]) -> list[tuple]:
    """(result, report) of each (case, block_rows, probe_rows) in `runs`, in one process group."""
    import torch.distributed as dist

    out = []
    for case, block_rows, probe_rows in runs:
        result = sharded_search(case[0], case[1], _source(case), k=K, far_targets=FARS, block_rows=block_rows,
                                probe_rows=probe_rows, group=dist.group.WORLD)
        out.append((result, search_report(result, case[1], cmc_ranks=(1, 3, 9), far_targets=FARS)))
    return out


def _brute_force(case):
    """Everything from the full float64 score matrix, one probe at a time."""
    probe_vectors, probe_labels = case[0], case[1]
    source = _source(case)
    gallery = source.read(0, source.rows).astype(np.float64)
    labels = source.labels(0, source.rows).tolist()
    candidates, genuine, impostors, mate_positions, hits, nonmated_tops = [], [], [], [], [], []
    for probe, label in zip(probe_vectors.astype(np.float64), probe_labels.tolist()):
        scores = [float(probe @ row) for row in gallery]
        order = brute_candidates(scores, len(scores))
        candidates.append(order[:K])
        genuine += [s for s, g in zip(scores, labels) if g == label]
        impostors += [s for s, g in zip(scores, labels) if g != label]
        if label in labels:
            mate_positions.append(next(p for p, j in enumerate(order, 1) if labels[j] == label))
            if labels[order[0]] == label:
                hits.append(scores[order[0]])
        else:
            nonmated_tops.append(scores[order[0]])
    return {"candidates": candidates, "scores": gallery @ probe_vectors.astype(np.float64).T, "labels": labels,
            "genuine": genuine, "impostors": impostors, "mate_positions": mate_positions, "hits": hits,
            "nonmated_tops": nonmated_tops}


@pytest.mark.parametrize("world, block_rows, probe_rows", [(1, 8, 4), (2, 5, 11), (3, 7, 3)])
def test_sharded_search_equals_brute_force(world, block_rows, probe_rows):
    case = _case()
    small = _case(seed=3, gallery=4, distractors=3, probes=5)  # 7 rows on 3 ranks: shares of 3, 3, 1 < K
    wide = _case(seed=4, gallery=40, distractors=300, probes=11)  # one block a rank: its floor alone bounds the list
    ranks = run_distributed(_search_on_rank, world, [(case, block_rows, probe_rows), (small, 2, 2), (wide, 512, 11)])
    expected = {name: _brute_force(c) for name, c in (("case", case), ("small", small), ("wide", wide))}
    for (result, report), (padded, _), (wide_result, wide_report) in ranks:  # every rank holds the merged answer
        _check_padding(padded, expected["small"])
        _check_against_brute_force(result, report, expected["case"])
        _check_against_brute_force(wide_result, wide_report, expected["wide"])


def _check_against_brute_force(result, report, expected) -> None:
    assert result.indices.tolist() == expected["candidates"]
    assert result.labels.tolist() == [[expected["labels"][j] for j in row] for row in expected["candidates"]]
    picked = np.take_along_axis(expected["scores"].T, np.array(expected["candidates"]), axis=1)
    assert np.allclose(result.scores, picked, atol=1e-6)
    assert sorted(result.genuine_scores.tolist()) == pytest.approx(sorted(expected["genuine"]), abs=1e-6)
    assert result.impostor_pairs == len(expected["impostors"])
    kept = sorted(result.top_impostor_scores.tolist(), reverse=True)
    assert len(kept) >= math.floor(max(FARS) * len(expected["impostors"])) + 1  # what TAR at 0.2 needs
    assert kept == pytest.approx(sorted(expected["impostors"], reverse=True)[:len(kept)], abs=1e-6)
    positions = expected["mate_positions"]
    assert report.identification.cmc == pytest.approx({r: sum(p <= r for p in positions) / len(positions)
                                                       for r in (1, 3, 9)})
    mated = len(positions)
    for got, target in zip(report.identification.tpir_at_fpir, (1e-1, 1e-2)):
        assert (got["rate"], got["reached"]) == pytest.approx(
            brute_rate_at(expected["nonmated_tops"], expected["hits"], mated, target)[:2])
    for got, target in zip(report.tar_at_far, FARS):
        assert (got["rate"], got["reached"]) == pytest.approx(
            brute_rate_at(expected["impostors"], expected["genuine"], len(expected["genuine"]), target)[:2])


def _check_padding(result, expected) -> None:
    """A gallery of 7 rows listed in full, the rest of the K places padded."""
    assert result.indices[:, :7].tolist() == expected["candidates"]
    assert (result.indices[:, 7:] == -1).all() and (result.labels[:, 7:] == NO_IDENTITY).all()


def test_block_topk_breaks_ties_by_lower_index():
    import torch

    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    values, indices = block_topk(scores, 3, first_index=100)
    assert indices.tolist() == [[101, 102, 103], [100, 101, 102]] and values.tolist() == [[2.0] * 3, [3.0] * 3]


def test_random_distractors_do_not_depend_on_how_they_are_read():
    source = RandomDistractors(DISTRACTOR_CHUNK_ROWS + 50, 8, seed=4)
    whole = source.read(0, source.rows)
    pieces = np.concatenate([source.read(a, min(a + 999, source.rows)) for a in range(0, source.rows, 999)])
    assert np.array_equal(whole, pieces) and np.allclose(np.linalg.norm(whole, axis=1), 1, atol=1e-6)


def test_search_rejects_bad_input():
    probes, labels = np.ones((2, 4), np.float32), np.zeros(2, np.int64)
    with pytest.raises(SearchError, match="probe embeddings have size 4 but gallery embeddings 3"):
        sharded_search(probes, labels, ArraySource(np.ones((5, 3), np.float32)))
    with pytest.raises(SearchError, match=r"different embedding sizes \[3, 4\]"):
        ConcatSource([ArraySource(np.ones((5, 3), np.float32)), RandomDistractors(10, 4)])
    with pytest.raises(SearchError, match="probe 1 has label -1, the label of distractors"):
        sharded_search(probes, np.array([0, -1]), ArraySource(np.ones((5, 4), np.float32)))
    bad = np.ones((5, 4), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(SearchError, match="gallery row 3 has a NaN"):
        sharded_search(probes, labels, ArraySource(bad))
    with pytest.raises(SearchError, match=r"TAR at FAR 0.1 over up to .* needs the .* highest impostor scores"):
        sharded_search(probes, labels, RandomDistractors(10**8, 4), far_targets=(0.1,))


def test_eval_search_tool_on_files_and_distractors(tmp_path, capfd):
    case = _case(seed=5, gallery=30, distractors=0, probes=12, dim=8)
    paths = {}
    for name, array in zip(("probes", "probe-labels", "gallery", "gallery-labels"), case[:4]):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], array)
    np.save(tmp_path / "other.npy", np.ones((3, 5), np.float32))
    tool = load_tool("eval_search")
    args = [arg for name, path in paths.items() for arg in (f"--{name}", path)]
    out = str(tmp_path / "s.json")
    status = tool.main([*args, "--distractors", "200", "--world", "1", "--block-rows", "64", "--check-probes", "12",
                        "--progress-every", "0.001", "--json", out])
    printed = capfd.readouterr().out
    assert status == 0 and "brute force: 12/12 candidate lists equal" in printed
    assert "search rank 0/1: gallery rows" in printed
    saved = json.load(open(out))
    assert saved["report"]["gallery_rows"] == 230 and saved["memory"][0]["peak_rss_mib"] > 0
    status = tool.main([*args[:6], "--gallery", str(tmp_path / "other.npy"), "--gallery-labels",
                        str(tmp_path / "other.npy"), "--world", "1"])
    assert status == 2 and "probe embeddings have size 8 but gallery embeddings 5" in capfd.readouterr().err


@pytest.mark.slow
def test_eval_search_tool_memory_stays_bounded_by_the_block(tmp_path):
    """1M distractors of size 128 (512 MiB) on 2 ranks, 4096-row blocks: no rank holds its 256 MiB share."""
    out = str(tmp_path / "s.json")
    status = load_tool("eval_search").main(["--synthetic-identities", "200", "--embedding-size", "128",
                                            "--distractors", "1000000", "--world", "2", "--block-rows", "4096",
                                            "--check-probes", "40", "--json", out])
    saved = json.load(open(out))
    assert status == 0 and saved["check"]["lists_equal"] == 40
    for rank in saved["memory"]:
        assert rank["peak_rss_mib"] - rank["peak_rss_mib_before_search"] < 128, rank
