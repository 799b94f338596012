"""IJB-B/C 1:N identification on fixtures in the protocol's file formats, against a plain brute force.

The 1:N CSV files are written as the IJB pack ships them: a header line, then one row per image
(TEMPLATE_ID,SUBJECT_ID,FILENAME,...). The model-free case writes random image features for 40
subjects; the tool case reuses the 1:1 fixture of tests/test_eval_ijb.py (real crops, real model).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from largefr.eval.ijb import IJBError, read_ijb_meta
from largefr.eval.ijb_1n import read_template_subjects, score_one_to_n
from largefr.eval.weights import load_backbone
from tests.eval_fixtures import load_tool, quickstart_checkpoint
from tests.test_eval_identification import brute_candidates, brute_rate_at
from tests.test_eval_ijb import TEMPLATE_IDENTITY, _brute_force_scores, _write_fixture

HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACIAL_HAIR,AGE,SKIN_TONE,GENDER\n"


def write_1n_csv(path: str, rows: list[tuple[int, int, str]]) -> None:
    """One line per image: template id, subject id, file name, then unused attribute columns."""
    with open(path, "w") as handle:
        handle.write(HEADER)
        handle.writelines(f"{t},{s},{name},{t * 7},0,30,3,1\n" for t, s, name in rows)


def brute_measures(scores: dict[tuple[int, int], float], probes: dict[int, int], gallery: dict[int, int]) -> dict:
    """CMC 1/5/10 and TPIR at FPIR 1e-1/1e-2 from (probe template, gallery template) -> score, plainly."""
    gallery_templates = sorted(gallery)
    positions, hits, nonmated_tops, mated = [], [], [], 0
    for probe, subject in sorted(probes.items()):
        row = [scores[probe, g] for g in gallery_templates]
        order = brute_candidates(row, len(row))
        if subject in gallery.values():
            mated += 1
            positions.append(next(p for p, j in enumerate(order, 1) if gallery[gallery_templates[j]] == subject))
            if gallery[gallery_templates[order[0]]] == subject:
                hits.append(row[order[0]])
        else:
            nonmated_tops.append(row[order[0]])
    out = {"cmc": {r: sum(p <= r for p in positions) / len(positions) for r in (1, 5, 10)}, "tpir": []}
    if nonmated_tops:
        out["tpir"] = [brute_rate_at(nonmated_tops, hits, mated, f)[:2] for f in (1e-1, 1e-2)]
    return out


def _check(result: dict, expected: dict) -> None:
    assert {int(k): v for k, v in result["cmc"].items()} == pytest.approx(expected["cmc"], abs=1e-12)
    got = [v for t in result["tpir_at_fpir"] for v in (t["rate"], t["reached"])]
    assert got == pytest.approx([v for pair in expected["tpir"] for v in pair], abs=1e-12)


def _write_feature_fixture(root: str, seed: int = 0):
    """40 subjects: G1 holds 0-19, G2 20-39, probes (2 per subject, several media) all 40; random features."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, 16))
    images, galleries = [], {"G1": {}, "G2": {}}
    probes: dict[int, int] = {}
    template = 100
    for subject in range(40):
        for role in ("gallery", "probe", "probe"):
            template += 3  # ids not contiguous
            for media in range(int(rng.integers(1, 4))):
                for _ in range(int(rng.integers(1, 3))):
                    feature = centers[subject] + 1.6 * rng.standard_normal(16)
                    images.append((f"{len(images)}.jpg", template, 1000 * template + media, feature,
                                   round(float(rng.uniform(0.3, 1.0)), 4)))
            (galleries["G1" if subject < 20 else "G2"] if role == "gallery" else probes)[template] = 5000 + subject
    os.makedirs(os.path.join(root, "meta"))
    with open(os.path.join(root, "meta", "ijbb_face_tid_mid.txt"), "w") as handle:
        handle.writelines(f"{name} {t} {m}\n" for name, t, m, _, _ in images)
    with open(os.path.join(root, "meta", "ijbb_name_5pts_score.txt"), "w") as handle:
        handle.writelines(f"{name} {' '.join(['50.0'] * 10)} {score}\n" for name, _, _, _, score in images)
    for kind, members in (("gallery_G1", galleries["G1"]), ("gallery_G2", galleries["G2"]), ("probe_mixed", probes)):
        write_1n_csv(os.path.join(root, "meta", f"ijbb_1N_{kind}.csv"),
                     [(t, s, f"img/{name}") for name, t, _, _, _ in images for tt, s in members.items() if tt == t])
    return images, galleries, probes


def _plain_template_vectors(images) -> dict[int, list[float]]:
    """Per template: score x feature, mean per media, sum over media, L2-normalized."""
    vectors = {}
    for template in sorted({t for _, t, _, _, _ in images}):
        total = np.zeros(16)
        for media in sorted({m for _, t, m, _, _ in images if t == template}):
            frames = [s * f for _, t, m, f, s in images if t == template and m == media]
            total = total + sum(frames) / len(frames)
        vectors[template] = (total / math.sqrt(float(total @ total))).tolist()
    return vectors


def test_ijb_1n_measures_match_brute_force(tmp_path):
    root = str(tmp_path / "IJBB")
    images, galleries, probes = _write_feature_fixture(root)
    meta = read_ijb_meta(root, "IJBB", with_pairs=False)
    results = {r.name: r.as_dict() for r in score_one_to_n(meta, np.array([i[3] for i in images]))}
    vectors = _plain_template_vectors(images)
    scores = {(p, g): sum(a * b for a, b in zip(vectors[p], vectors[g])) for p in vectors for g in vectors}
    expected = {name: brute_measures(scores, probes, gallery) for name, gallery in galleries.items()}
    for name in ("G1", "G2"):
        assert results[name]["mated_probes"] == 40 and results[name]["probes"] == 80
        _check(results[name], expected[name])
    assert (results["mean"]["probes"], results["mean"]["mated_probes"], results["mean"]["gallery"]) == (80, 80, 40)
    assert results["mean"]["cmc"][1] == pytest.approx((expected["G1"]["cmc"][1] + expected["G2"]["cmc"][1]) / 2)
    union = brute_measures(scores, probes, {**galleries["G1"], **galleries["G2"]})
    _check(results["G1+G2"], union)
    assert 0.2 < union["cmc"][1] < 1.0  # informative: neither perfect nor chance


def test_eval_ijb_tool_1n_matches_brute_force(tmp_path):
    checkpoint = quickstart_checkpoint()
    images = _write_fixture(str(tmp_path / "IJBC"))
    galleries = {"G1": {11: 900, 21: 901}, "G2": {31: 902}}
    probes = {12: 900, 22: 901, 32: 902}
    for kind, members in (("gallery_G1", galleries["G1"]), ("gallery_G2", galleries["G2"]), ("probe_mixed", probes)):
        write_1n_csv(str(tmp_path / "IJBC" / "meta" / f"ijbc_1N_{kind}.csv"),
                     [(i["template"], members[i["template"]], i["name"]) for i in images if i["template"] in members])
    out = {"json": str(tmp_path / "1n.json"), "png": str(tmp_path / "1n.png")}
    status = load_tool("eval_ijb").main(["--weights", checkpoint.weights, "--ijb-root", str(tmp_path), "--target",
                                        "IJBC", "--protocol", "1:N", "--batch-size", "4", "--workers", "2",
                                        "--json", out["json"], "--png", out["png"], "--device", "cpu"])
    assert status == 0
    pairs = [(p, g) for p in probes for g in TEMPLATE_IDENTITY if g not in probes]
    model = load_backbone(weights=checkpoint.weights).model
    scores = dict(zip(pairs, _brute_force_scores(model, images, pairs)))
    results = {r["name"]: r for r in json.load(open(out["json"]))["results"]}
    for name, gallery in galleries.items():
        _check(results[name], brute_measures(scores, probes, gallery))
    _check(results["G1+G2"], brute_measures(scores, probes, {**galleries["G1"], **galleries["G2"]}))
    assert os.path.getsize(out["png"]) > 10_000


def test_1n_errors_name_file_line_and_template(tmp_path, capsys):
    path = str(tmp_path / "g.csv")
    with open(path, "w") as handle:
        handle.write("3,7,a.jpg\n")
    with pytest.raises(IJBError, match=r"g.csv:1: expected a header line \(TEMPLATE_ID,SUBJECT_ID"):
        read_template_subjects(path)
    write_1n_csv(path, [(3, 7, "a.jpg"), (3, 8, "b.jpg")])
    with pytest.raises(IJBError, match=r"g.csv:3: template 3 has subject 8 here but 7 on an earlier line"):
        read_template_subjects(path)
    root = str(tmp_path / "IJBB")
    images, galleries, probes = _write_feature_fixture(root)
    meta = read_ijb_meta(root, "IJBB", with_pairs=False)
    features = np.array([i[3] for i in images])
    lonely = max(probes)  # a probe whose subject no gallery holds: closed-set G1+G2 refuses it
    write_1n_csv(os.path.join(root, "meta", "ijbb_1N_probe_mixed.csv"),
                 [(t, 99 if t == lonely else probes[t], name) for name, t, _, _, _ in images if t in probes])
    with pytest.raises(ValueError, match=rf"probe template {lonely} \(subject 99\) has no mate in the gallery"):
        score_one_to_n(meta, features)
    write_1n_csv(os.path.join(root, "meta", "ijbb_1N_gallery_G2.csv"), [(77, 1, "x.jpg")])
    with pytest.raises(IJBError, match=r"ijbb_1N_gallery_G2.csv: template 77 \(1 such\) has no image"):
        score_one_to_n(meta, features)
