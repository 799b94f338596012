"""Evaluation of your own identity folders / .rec (pairs, 1:N split, tool, trainer target) against brute force."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data.synthetic_faces import render_identity_image, sample_identity
from largefr.eval.embed import ImageFolderError
from largefr.eval.labelled_images import load_labelled_images
from largefr.eval.own_data import load_own_data_share, make_pairs, read_pairs, split_gallery, write_pairs
from largefr.eval.weights import load_backbone
from tests.eval_fixtures import load_tool, quickstart_checkpoint, synthetic_data
from tests.test_eval_identification import brute_candidates, brute_rate_at
from tests.test_eval_roc import brute_force_roc, brute_force_tar
from tests.test_eval_verification import _brute_force as brute_force_accuracy

IDENTITIES, PER_IDENTITY = 5, 3


def write_identity_folder(root: str, identities: int = IDENTITIES, per_identity: int = PER_IDENTITY,
                          seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    for number in range(identities):
        person = sample_identity(np.random.default_rng([seed, number]))
        os.makedirs(os.path.join(root, f"person_{number:02d}"))
        for image in range(per_identity):
            Image.fromarray(render_identity_image(person, rng, 112)).save(
                os.path.join(root, f"person_{number:02d}", f"{image}.png"))
    return root


def test_pairs_are_balanced_seeded_and_exhaustive_when_few():
    labels = np.repeat(np.arange(5), [2, 3, 4, 1, 3])
    every_positive = {(a, b) for a, b in itertools.combinations(range(len(labels)), 2) if labels[a] == labels[b]}
    pair_list = make_pairs(labels, num_pairs=200, seed=3)  # more than the 1 + 3 + 6 + 3 = 13 positives exist
    positives = {tuple(p) for p, s in zip(pair_list.pairs.tolist(), pair_list.issame) if s}
    negatives = [tuple(p) for p, s in zip(pair_list.pairs.tolist(), pair_list.issame) if not s]
    assert positives == every_positive and len(negatives) == len(set(negatives)) == 13
    assert all(a < b and labels[a] != labels[b] for a, b in negatives)
    again, other = make_pairs(labels, num_pairs=200, seed=3), make_pairs(labels, num_pairs=200, seed=4)
    assert np.array_equal(again.pairs, pair_list.pairs) and not np.array_equal(other.pairs, pair_list.pairs)
    sample = make_pairs(labels, num_pairs=10, seed=0)
    assert sample.issame.sum() == 5 and {tuple(p) for p in sample.pairs[sample.issame].tolist()} <= every_positive


def test_split_leaves_identities_out_and_one_gallery_image_per_identity():
    labels = np.repeat(np.arange(10), 4)
    split = split_gallery(labels, seed=1, nonmated_fraction=0.2)
    assert np.array_equal(np.sort(np.concatenate([split.gallery, split.probes])), np.arange(40))
    assert sorted(labels[split.gallery].tolist()) == sorted(set(labels[split.gallery].tolist()))
    assert len(split.gallery) == 8 and len(set(labels[split.probes]) - set(labels[split.gallery])) == 2
    assert np.array_equal(split_gallery(labels, seed=1).gallery, split.gallery)


def _plain_embeddings(model: torch.nn.Module, folder: str, names: list[str]) -> list[list[float]]:
    with torch.no_grad():
        out = []
        for name in names:
            pixels = (torch.from_numpy(np.array(Image.open(os.path.join(folder, name)).convert("RGB")))
                      .permute(2, 0, 1).float()[None] - 127.5) / 127.5
            out.append((model(pixels) + model(torch.flip(pixels, dims=[3])))[0].tolist())
    return out


def _cosine(a, b) -> float:
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def test_eval_folder_tool_matches_brute_force(tmp_path):
    folder = write_identity_folder(str(tmp_path / "faces"))
    weights = quickstart_checkpoint().weights
    out = {"pairs": str(tmp_path / "pairs.txt"), "json": str(tmp_path / "r.json")}
    args = ["--weights", weights, "--images", folder, "--num-pairs", "20", "--seed", "2", "--batch-size", "6",
            "--device", "cpu"]
    assert load_tool("eval_folder").main([*args, "--out", out["pairs"], "--json", out["json"]]) == 0
    result = json.load(open(out["json"]))["result"]
    names = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    lines = [line.split("\t") for line in open(out["pairs"]).read().splitlines()[1:]]
    assert len(lines) == 20 and sum(line[2] == "1" for line in lines) == 10
    assert all((a.split("/")[0] == b.split("/")[0]) == (same == "1") for a, b, same in lines)
    embedding = dict(zip(names, _plain_embeddings(load_backbone(weights=weights).model, folder, names)))
    issame = [same == "1" for _, _, same in lines]
    accuracy, _ = brute_force_accuracy(np.array([embedding[n] for a, b, _ in lines for n in (a, b)]), issame, 10)
    assert result["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    cosines = [_cosine(embedding[a], embedding[b]) for a, b, _ in lines]
    assert np.std(cosines) > 0.05  # informative scores
    points = brute_force_roc(cosines, issame)
    for entry in result["tar_at_far"]:
        assert entry["tar"] == pytest.approx(brute_force_tar(points, entry["far_target"]), abs=1e-9)
    split = split_gallery(np.repeat(np.arange(IDENTITIES), PER_IDENTITY), seed=2)
    person = [n.split("/")[0] for n in names]
    gallery = [names[i] for i in split.gallery]
    positions, hits, nonmated_tops = [], [], []
    for probe in (names[i] for i in split.probes):
        row = [_cosine(embedding[probe], embedding[g]) for g in gallery]
        order = brute_candidates(row, len(row))
        mates = [p for p, j in enumerate(order, 1) if gallery[j].split("/")[0] == probe.split("/")[0]]
        if mates:
            positions.append(mates[0])
            hits += [row[order[0]]] if mates[0] == 1 else []
        else:
            nonmated_tops.append(row[order[0]])
    assert len(set(person)) == IDENTITIES and nonmated_tops
    ident = result["identification"]
    assert ident["cmc"]["1"] == pytest.approx(sum(p == 1 for p in positions) / len(positions))
    assert ident["cmc"]["5"] == pytest.approx(sum(p <= 5 for p in positions) / len(positions))
    for entry in ident["tpir_at_fpir"]:
        assert entry["rate"] == pytest.approx(brute_rate_at(nonmated_tops, hits, len(positions), entry["target"])[0])
    # the search tool embeds the same folder and splits it the same way
    search_json = str(tmp_path / "search.json")
    assert load_tool("eval_search").main(["--weights", weights, "--images", folder, "--seed", "2", "--device", "cpu",
                                          "--world", "1", "--json", search_json]) == 0
    searched = json.load(open(search_json))["report"]["identification"]
    assert searched["gallery"] == len(gallery) and searched["mated_probes"] == len(positions)
    assert searched["cmc"]["1"] == pytest.approx(sum(p == 1 for p in positions) / len(positions))
    reread = read_pairs(out["pairs"], names)  # the written list reads back as drawn
    drawn = make_pairs(np.repeat(np.arange(IDENTITIES), PER_IDENTITY), num_pairs=20, seed=2)
    assert np.array_equal(reread.pairs, drawn.pairs) and np.array_equal(reread.issame, drawn.issame)


def test_own_data_errors_name_the_problem(tmp_path, capsys):
    folder = write_identity_folder(str(tmp_path / "faces"), identities=3, per_identity=2)
    os.remove(os.path.join(folder, "person_01", "1.png"))
    with pytest.raises(ImageFolderError, match=r"identity 'person_01' has one image \(person_01/0.png\) and so no "
                                               "positive pair"):
        load_labelled_images(folder)
    assert len(load_labelled_images(folder, allow_singletons=True)) == 5
    with open(os.path.join(folder, "person_01", "2.png"), "wb") as handle:
        handle.write(b"not a png")
    status = load_tool("eval_folder").main(["--weights", quickstart_checkpoint().weights, "--images", folder,
                                            "--num-pairs", "4", "--out", str(tmp_path / "p.txt"), "--device", "cpu"])
    assert status == 2 and "person_01/2.png: unreadable image" in capsys.readouterr().err
    Image.new("RGB", (112, 112)).save(os.path.join(folder, "loose.png"))
    with pytest.raises(ImageFolderError, match="loose.png: images must sit in identity sub-folders"):
        load_labelled_images(folder)
    write_pairs(str(tmp_path / "p.txt"), ["a", "b", "c"], make_pairs(np.array([0, 0, 1]), num_pairs=2))
    with pytest.raises(ImageFolderError, match=r"p.txt:2: image .* is not in the evaluated data"):
        read_pairs(str(tmp_path / "p.txt"), ["x"])


def test_folder_and_rec_shares_are_the_pair_images_in_order(tmp_path):
    folder = write_identity_folder(str(tmp_path / "faces"), identities=4, per_identity=3)
    images = load_labelled_images(folder)
    pair_list = make_pairs(images.labels)
    expected = np.stack([images.read(int(i), 112) for i in pair_list.pairs.reshape(-1)])
    shares = [load_own_data_share(folder, image_size=112, rank=r, world_size=3) for r in range(3)]
    assert np.array_equal(torch.cat([s[0] for s in shares]).permute(0, 2, 3, 1).numpy(), expected)
    assert all(s[1] == pair_list.issame.tolist() for s in shares)
    cache = str(tmp_path / "cache")
    rec = load_labelled_images(synthetic_data(), cache_dir=cache)  # a train.rec folder: identities are the labels
    assert len(rec.identities) > 1 and rec.read(0, 112).shape == (112, 112, 3)
    share = load_own_data_share(synthetic_data(), image_size=112, cache_dir=cache)[0]
    assert share.shape[0] == 2 * len(make_pairs(rec.labels).issame)


def test_trainer_loads_an_identity_folder_as_a_validation_target(tmp_path):
    from largefr.config import Config
    from largefr.data.prepare import DataSetupError, PreparedData
    from largefr.train.build import load_verification_sets
    from largefr.train.distributed_env import DistributedEnv
    from tests.eval_fixtures import quickstart_config

    folder = write_identity_folder(str(tmp_path / "team_faces"), identities=3, per_identity=2)
    raw = quickstart_config(synthetic_data(), str(tmp_path / "run"))
    raw["data"]["val_targets"] = ["synth_val", folder]
    config = Config.from_dict(raw, world_size=2)
    sets = [load_verification_sets(PreparedData(config=config, folder=synthetic_data(), records_left_out=0,
                                                env=DistributedEnv(rank=rank, world_size=2, local_rank=rank,
                                                                   launcher="env", backend="gloo",
                                                                   device=torch.device("cpu"))))
            for rank in range(2)]
    assert [s.name for s in sets[0]] == ["synth_val", "team_faces"]
    images = load_labelled_images(folder)
    pair_list = make_pairs(images.labels)
    both = torch.cat([sets[0][1].local_images, sets[1][1].local_images]).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(both, np.stack([images.read(int(i), 112) for i in pair_list.pairs.reshape(-1)]))
    assert sets[1][1].issame == pair_list.issame.tolist()
    raw["data"]["val_targets"] = [str(tmp_path / "missing_folder")]
    with pytest.raises(DataSetupError, match=r"missing_folder' \(data.val_targets\) not found; looked for .*"
                                             r"missing_folder.*Give a .bin path \(or an identity folder\)"):
        load_verification_sets(PreparedData(config=Config.from_dict(raw, world_size=1), folder=synthetic_data(),
                                            records_left_out=0, env=DistributedEnv(
            rank=0, world_size=1, local_rank=0, launcher="single", backend="gloo", device=torch.device("cpu"))))
