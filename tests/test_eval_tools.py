"""The verification, similarity-plot and embedding tools on the quickstart checkpoint, against brute force."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data.verification_bin import decode_pairs, load_bin
from largefr.eval.weights import load_backbone
from tests.eval_fixtures import load_tool, quickstart_checkpoint, synthetic_data
from tests.test_eval_roc import brute_force_roc, brute_force_tar
from tests.test_eval_verification import _brute_force as brute_force_accuracy


def _bin_path() -> str:
    return os.path.join(synthetic_data(), "synth_val.bin")


def _plain_flip_embeddings(model: torch.nn.Module, images: torch.Tensor) -> list[list[float]]:
    """One image at a time: embedding of the image plus that of its mirror image."""
    with torch.no_grad():
        return [(model(image[None]) + model(torch.flip(image[None], dims=[3])))[0].tolist() for image in images]


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _bin_brute_force(source: str):
    """Flip-sum embeddings, pair cosines and issame of synth_val.bin, computed plainly."""
    checkpoint = quickstart_checkpoint()
    model = load_backbone(**{source: checkpoint.weights if source == "weights" else checkpoint.root}).model
    images, issame = load_bin(_bin_path())
    embeddings = _plain_flip_embeddings(model, decode_pairs(images, 112))
    cosines = [_cosine(embeddings[2 * i], embeddings[2 * i + 1]) for i in range(len(issame))]
    return np.array(embeddings), cosines, issame


@pytest.fixture(scope="module")
def bin_brute_force():
    embeddings, cosines, issame = _bin_brute_force("weights")
    assert np.std(cosines) > 0.05  # informative embeddings, not a degenerate model
    return embeddings, cosines, issame


@pytest.mark.parametrize("source", ["weights", "checkpoint"])
def test_eval_verification_matches_brute_force(tmp_path, source, bin_brute_force, capsys):
    checkpoint = quickstart_checkpoint()
    path = checkpoint.weights if source == "weights" else checkpoint.root
    out = str(tmp_path / "v.json")
    assert load_tool("eval_verification").main([f"--{source}", path, "--bins", _bin_path(), "--batch-size", "6",
                                                "--json", out, "--device", "cpu"]) == 0
    assert "synth_val" in capsys.readouterr().out
    summary = json.load(open(out))
    assert (summary["model"]["network"], summary["model"]["embedding_size"]) == ("mbf", 128)
    result = summary["results"][0]
    embeddings, cosines, issame = bin_brute_force if source == "weights" else _bin_brute_force(source)
    accuracy, std = brute_force_accuracy(embeddings, issame, 10)
    assert (result["pairs"], result["accuracy"], result["std"]) == (len(issame), pytest.approx(accuracy, abs=1e-12),
                                                                     pytest.approx(std, abs=1e-12))
    if source == "weights":  # the raw short run's cosines all lie within ~1e-7 of 1: their order is noise
        assert result["tar"] == pytest.approx(brute_force_tar(brute_force_roc(cosines, issame), 1e-3), abs=1e-12)


def test_plot_similarity_means_and_gap(tmp_path, bin_brute_force):
    _, cosines, issame = bin_brute_force
    out, summary = str(tmp_path / "sim.png"), str(tmp_path / "sim.json")
    assert load_tool("plot_similarity").main(["--weights", quickstart_checkpoint().weights, "--bins", _bin_path(),
                                              "--out", out, "--json", summary]) == 0
    stats = json.load(open(summary))
    positive = [c for c, same in zip(cosines, issame) if same]
    negative = [c for c, same in zip(cosines, issame) if not same]
    assert stats["positive_mean"] == pytest.approx(sum(positive) / len(positive), abs=1e-5)
    assert stats["negative_mean"] == pytest.approx(sum(negative) / len(negative), abs=1e-5)
    assert stats["gap"] == pytest.approx(stats["positive_mean"] - stats["negative_mean"], abs=1e-12)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] >= 600


def _write_identity_folders(root: str) -> tuple[list[str], torch.Tensor]:
    """The first 8 .bin images as PNG crops in two identity subfolders; returns relative names and pixels."""
    images, _ = load_bin(_bin_path())
    pixels = decode_pairs(images[:8], 112)
    names = []
    for index in range(8):
        name = os.path.join(f"person_{index % 2}", f"{index:02d}.png")
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        array = (pixels[index].permute(1, 2, 0) * 127.5 + 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(array).save(os.path.join(root, name))
        names.append(name)
    return names, pixels


def test_embed_then_cluster(tmp_path, capsys):
    names, pixels = _write_identity_folders(str(tmp_path / "faces"))
    out, labels = str(tmp_path / "emb.npy"), str(tmp_path / "labels.npy")
    assert load_tool("embed").main(["--weights", quickstart_checkpoint().weights, "--images", str(tmp_path / "faces"),
                                    "--out", out, "--labels-out", labels, "--batch-size", "3"]) == 0
    order = sorted(range(8), key=lambda i: names[i])
    assert open(tmp_path / "emb.txt").read().split() == [names[i] for i in order]
    model = load_backbone(weights=quickstart_checkpoint().weights).model
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(pixels[order]), dim=1).numpy()
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-5)
    assert np.load(labels).tolist() == [int(names[i].split("_")[1][0]) for i in order]
    capsys.readouterr()
    assert load_tool("eval_clustering").main(["--embeddings", out, "--labels", labels, "--method", "kmeans"]) == 0
    assert "8 items, 2 identities -> 2 clusters" in capsys.readouterr().out


def test_embed_refuses_unaligned_image(tmp_path, capsys):
    os.makedirs(tmp_path / "faces")
    Image.new("RGB", (100, 120)).save(tmp_path / "faces" / "big.jpg")
    assert load_tool("embed").main(["--weights", quickstart_checkpoint().weights, "--images",
                                    str(tmp_path / "faces"), "--out", str(tmp_path / "e.npy")]) == 2
    assert "big.jpg: 100x120 pixels is not a square aligned face crop; align it first" in capsys.readouterr().err


def test_command_line_errors_name_the_problem(repo_root, capsys):
    weights = quickstart_checkpoint().weights
    wrong = subprocess.run([sys.executable, "tools/eval_verification.py", "--weights", weights, "--network", "r18",
                            "--bins", _bin_path()], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2
    assert "weights do not fit network 'r18'" in wrong.stderr and "they fit --network mbf" in wrong.stderr
    assert "missing keys (conv1.weight" in wrong.stderr
    assert load_tool("eval_verification").main(["--weights", weights, "--bins", "nowhere.bin"]) == 2
    assert "nowhere.bin: no such verification file" in capsys.readouterr().err
