"""Synthetic face-like data sets: determinism, insightface layout, held-out pairs, variation, the tool."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from largefr.data import synthetic
from largefr.data.recordio import IndexedRecordReader, read_property, unpack_header
from largefr.data.synthetic import (HELDOUT_DIR, META_FILE, VAL_FILE, ensure_dataset, generate_dataset, read_meta,
                                    render_identity_image, sample_identity, validate_arguments)
from largefr.data.verification_bin import load_bin

SMALL = dict(identities=3, images_per_identity=4, pairs=6, image_size=112)
HELDOUT = dict(heldout_identities=3, heldout_images_per_identity=2)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    generate_dataset(out, seed=7, progress=False, **SMALL, **HELDOUT)
    return out


def _heldout_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / HELDOUT_DIR).rglob("*.jpg"))}


def test_render_shape_dtype_and_determinism():
    identity = sample_identity(np.random.default_rng(1))
    for size in (112, 64):
        image = render_identity_image(identity, np.random.default_rng(5), size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, render_identity_image(identity, np.random.default_rng(5), size))
    assert sample_identity(np.random.default_rng(1)) == identity
    assert sample_identity(np.random.default_rng(2)) != identity


def test_same_seed_same_bytes_different_seed_differs(tmp_path, small_set):
    again = tmp_path / "again"
    generate_dataset(again, seed=7, progress=False, **SMALL, **HELDOUT)
    for name in ("train.rec", "train.idx", "property", VAL_FILE, META_FILE):
        assert (again / name).read_bytes() == (small_set / name).read_bytes(), name
    assert _heldout_files(again) == _heldout_files(small_set) and len(_heldout_files(again)) == 6
    other = tmp_path / "other"
    generate_dataset(other, seed=8, progress=False, **SMALL, **HELDOUT)
    assert (other / "train.rec").read_bytes() != (small_set / "train.rec").read_bytes()
    assert (other / VAL_FILE).read_bytes() != (small_set / VAL_FILE).read_bytes()
    assert set(_heldout_files(other).values()).isdisjoint(_heldout_files(small_set).values())


def test_heldout_folder_leaves_training_and_val_bytes_unchanged(tmp_path, small_set):
    without = tmp_path / "without"
    generate_dataset(without, seed=7, progress=False, **SMALL)
    for name in ("train.rec", "train.idx", "property", VAL_FILE):
        assert (without / name).read_bytes() == (small_set / name).read_bytes(), name
    assert not (without / HELDOUT_DIR).exists() and read_meta(without)["heldout_dir"] is None


def test_heldout_folder_layout_counts_and_meta(small_set):
    from largefr.eval.embed import labels_from_subfolders, list_images

    names = list_images(str(small_set / HELDOUT_DIR))
    labels, identities = labels_from_subfolders(names)
    assert len(names) == 6 and identities == ["id00000", "id00001", "id00002"]
    assert np.bincount(labels).tolist() == [2, 2, 2]
    assert all(_decode((small_set / HELDOUT_DIR / name).read_bytes()).shape == (112, 112, 3) for name in names)
    meta = read_meta(small_set)
    assert meta["heldout_identities"] == 3 and meta["heldout_images_per_identity"] == 2
    assert meta["heldout_dir"] == HELDOUT_DIR and HELDOUT_DIR in meta["files"]
    others = set(range(*meta["train_identity_ids"])) | set(meta["val_identity_ids"])
    assert len(meta["heldout_identity_ids"]) == 3 and others.isdisjoint(meta["heldout_identity_ids"])


def test_heldout_images_of_one_identity_vary(small_set):
    pixels = [_decode(p.read_bytes()).astype(np.float32) for p in sorted((small_set / HELDOUT_DIR / "id00000").iterdir())]
    assert len(pixels) == 2 and np.abs(pixels[0] - pixels[1]).mean() > 10.0


def test_workers_do_not_change_the_bytes(tmp_path, small_set):
    pooled = tmp_path / "pooled"
    generate_dataset(pooled, seed=7, progress=False, workers=2, **SMALL)
    for name in ("train.rec", "train.idx", VAL_FILE):
        assert (pooled / name).read_bytes() == (small_set / name).read_bytes(), name


def test_train_files_in_insightface_layout(small_set):
    assert read_property(str(small_set)) == (3, 112, 112)
    reader = IndexedRecordReader(str(small_set / "train.rec"), str(small_set / "train.idx"))
    keys = reader.image_keys()
    assert keys == list(range(1, 3 * 4 + 1))
    labels = []
    for key in keys:
        label, image = reader.read_sample(key)
        assert label == int(label) and 0 <= label < 3
        assert image[:2] == b"\xff\xd8" and _decode(image).shape == (112, 112, 3)
        labels.append(int(label))
    assert labels == sorted(labels) and np.bincount(labels).tolist() == [4, 4, 4]
    flag, label, *_ = unpack_header(reader.read(0))
    assert flag == 2 and label == (13.0, 16.0)  # header: identity records at keys 13..15
    for cls, key in enumerate(range(13, 16)):
        _, image_range, *_ = unpack_header(reader.read(key))
        assert image_range == (1.0 + 4 * cls, 5.0 + 4 * cls)


def test_val_pairs_are_half_same_and_held_out(small_set):
    images, issame = load_bin(str(small_set / VAL_FILE))
    assert len(issame) == 6 and len(images) == 12 and sum(issame) == 3
    meta = read_meta(small_set)
    train_ids = set(range(*meta["train_identity_ids"]))
    assert train_ids == {0, 1, 2}
    assert not train_ids & set(meta["val_identity_ids"])
    assert len(meta["pair_identity_ids"]) == 6
    for (first, second), same in zip(meta["pair_identity_ids"], issame):
        assert (first == second) == same
        assert first in meta["val_identity_ids"] and second in meta["val_identity_ids"]
    assert all(_decode(image).shape == (112, 112, 3) for image in images)


def test_held_out_identities_are_not_training_faces():
    seed, identities = 3, 50
    train = {synthetic.sample_identity(synthetic._rng(seed, synthetic._TRAIN_IDENTITY, k)) for k in range(identities)}
    held_out = {synthetic.sample_identity(synthetic._rng(seed, synthetic._VAL_IDENTITY, k)) for k in range(20)}
    assert len(train) == identities and not train & held_out
    labelled = {synthetic.sample_identity(synthetic._rng(seed, synthetic._HELDOUT_IDENTITY, k)) for k in range(20)}
    assert len(labelled) == 20 and not labelled & train and not labelled & held_out


def test_images_of_one_identity_vary(small_set):
    reader = IndexedRecordReader(str(small_set / "train.rec"), str(small_set / "train.idx"))
    pixels = [_decode(reader.read_sample(key)[1]).astype(np.float32) for key in range(1, 5)]  # identity 0
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(pixels[i] - pixels[j]).mean() > 10.0, (i, j)


def _best_threshold_accuracy(similarity: np.ndarray, issame: np.ndarray) -> float:
    return max(float(np.mean((similarity >= t) == issame)) for t in similarity)


def test_raw_pixels_barely_verify(tmp_path):
    """Identities are not trivial: raw-pixel cosine similarity stays far from the quickstart's 0.85
    (about 0.70 with the best threshold chosen on the test pairs themselves, an optimistic bound)."""
    out = tmp_path / "raw"
    generate_dataset(out, identities=2, images_per_identity=1, pairs=400, seed=11, progress=False)
    images, issame = load_bin(str(out / VAL_FILE))
    flat = np.stack([_decode(image) for image in images]).reshape(len(images), -1).astype(np.float64)
    flat = (flat - 127.5) / 127.5
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    similarity = (flat[0::2] * flat[1::2]).sum(axis=1)
    accuracy = _best_threshold_accuracy(similarity, np.array(issame))
    assert 0.5 <= accuracy < 0.8, accuracy


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the verification pairs")

    monkeypatch.setattr(synthetic, "_write_val", fail)
    out = tmp_path / "set"
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset(out, seed=0, progress=False, **SMALL)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_folder_refused_unless_overwrite(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    generate_dataset(out, seed=0, progress=False, **SMALL)  # an empty folder is fine
    shutil.rmtree(out)
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an empty folder.*overwrite"):
        generate_dataset(out, seed=0, progress=False, **SMALL)
    assert (out / "keep.txt").exists()
    generate_dataset(out, seed=0, progress=False, overwrite=True, **SMALL)
    assert not (out / "keep.txt").exists() and (out / "train.rec").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_ensure_dataset_reuses_a_matching_cache_and_refuses_another(tmp_path):
    out = tmp_path / "cache"
    meta = ensure_dataset(out, seed=1, progress=False, **SMALL)
    assert meta["num_images"] == 12 and meta["num_classes"] == 3
    stamp = (out / "train.rec").stat().st_mtime_ns
    assert ensure_dataset(out, seed=1, progress=False, **SMALL) == meta
    assert (out / "train.rec").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="different synthetic data set.*seed: has 1, wanted 2"):
        ensure_dataset(out, seed=2, progress=False, **SMALL)
    assert ensure_dataset(out, seed=2, progress=False, replace_stale=True, **SMALL)["seed"] == 2
    assert read_meta(out)["seed"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_ensure_dataset_never_touches_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileNotFoundError, match="synth_meta.json is missing"):
        ensure_dataset(tmp_path, seed=0, progress=False, replace_stale=True, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_progress_lines_on_stderr(tmp_path, capsys):
    generate_dataset(tmp_path / "set", seed=0, progress=True, **SMALL)
    err = capsys.readouterr().err
    assert "synthetic: train 12/12 images" in err and "synthetic: val 12/12 images" in err


def test_validate_arguments_reports_every_problem():
    with pytest.raises(ValueError, match="identities must be >= 2.*pairs must be an even.*image size"):
        validate_arguments(identities=1, images_per_identity=2, pairs=3, image_size=8, seed=0, workers=1)
    with pytest.raises(ValueError, match="held-out identities must be 0 .none. or >= 2.*held-out images per identity"):
        validate_arguments(identities=2, images_per_identity=2, pairs=2, image_size=32, seed=0, workers=1,
                           heldout_identities=1, heldout_images_per_identity=-1)


def test_ensure_dataset_regenerates_when_the_heldout_counts_change(tmp_path):
    out = tmp_path / "cache"
    ensure_dataset(out, seed=1, progress=False, **SMALL)
    with pytest.raises(ValueError, match="heldout_identities: has 0, wanted 3"):
        ensure_dataset(out, seed=1, progress=False, **SMALL, **HELDOUT)
    meta = ensure_dataset(out, seed=1, progress=False, replace_stale=True, **SMALL, **HELDOUT)
    assert meta["heldout_identities"] == 3 and len(_heldout_files(out)) == 6


TOOL = [sys.executable, "tools/make_synthetic.py"]


def _tool_main(repo_root: str):
    spec = importlib.util.spec_from_file_location("make_synthetic", Path(repo_root) / "tools" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("extra, message", [
    (["--identities", "5", "--pairs", "7"], "pairs must be an even number >= 2"),
    (["--identities", "5", "--pairs", "0"], "pairs must be an even number >= 2"),
    (["--identities", "1", "--pairs", "4"], "identities must be >= 2"),
    (["--identities", "2", "--heldout-identities", "1"], "held-out identities must be 0 (none) or >= 2"),
])
def test_tool_bad_arguments(repo_root, tmp_path, extra, message):
    args = ["--out", str(tmp_path / "out"), "--images-per-identity", "2", *extra]
    result = subprocess.run(TOOL + args, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and not (tmp_path / "out").exists()


def test_tool_writes_a_data_set_and_refuses_a_non_empty_folder(repo_root, tmp_path):
    out = tmp_path / "out"
    args = ["--out", str(out), "--identities", "2", "--images-per-identity", "2", "--pairs", "2", "--quiet",
            "--heldout-identities", "2", "--heldout-images-per-identity", "3"]
    done = subprocess.run(TOOL + args, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_images"] == 4 and (out / VAL_FILE).exists()
    assert json.loads(done.stdout)["heldout_images"] == 6 and len(_heldout_files(out)) == 6
    again = subprocess.run(TOOL + args, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr and "--overwrite" in again.stderr
    assert _tool_main(repo_root)(args + ["--overwrite", "--seed", "3"]) == 0  # in-process: no second torch import
    assert read_meta(out)["seed"] == 3


def _tiny_cnn(embedding: int = 128):
    import torch.nn as nn

    def stage(inp: int, out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(inp, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.PReLU(out),
                             nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out), nn.PReLU(out))

    return nn.Sequential(stage(3, 24), stage(24, 48), stage(48, 96), stage(96, 128), nn.Flatten(),
                         nn.Linear(128 * 7 * 7, embedding), nn.BatchNorm1d(embedding))


def _pixels_to_tensor(images: list[bytes]):
    import torch

    return (torch.from_numpy(np.stack([_decode(image) for image in images])).permute(0, 3, 1, 2).float() - 127.5) / 127.5


def _verification_accuracy(net, val, issame: np.ndarray) -> float:
    import torch
    import torch.nn.functional as F

    net.eval()
    with torch.no_grad():
        embeddings = F.normalize(torch.cat([net(val[i:i + 200]) for i in range(0, len(val), 200)]), dim=1)
    return _best_threshold_accuracy((embeddings[0::2] * embeddings[1::2]).sum(1).numpy(), issame)


@pytest.mark.slow
def test_small_cnn_learns_what_an_untrained_one_cannot(tmp_path):
    """Calibration of the difficulty (a few CPU minutes): a tiny CNN trained with a cosine-margin
    softmax for 150 steps verifies held-out identities far better than the same net untrained."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    out = tmp_path / "learn"
    generate_dataset(out, identities=100, images_per_identity=20, pairs=400, seed=5, progress=False)
    reader = IndexedRecordReader(str(out / "train.rec"), str(out / "train.idx"))
    samples = [reader.read_sample(key) for key in reader.image_keys()]
    train, labels = _pixels_to_tensor([image for _, image in samples]), torch.tensor([int(l) for l, _ in samples])
    images, issame = load_bin(str(out / VAL_FILE))
    val, issame = _pixels_to_tensor(images), np.array(issame)
    net = _tiny_cnn()
    untrained = _verification_accuracy(net, val, issame)
    weight = torch.nn.Parameter(torch.randn(100, 128) * 0.01)
    optimizer = torch.optim.Adam([*net.parameters(), weight], lr=2e-3)
    for _ in range(150):
        net.train()
        batch = torch.randint(0, len(train), (64,))
        cosine = F.normalize(net(train[batch]), dim=1) @ F.normalize(weight, dim=1).T
        loss = F.cross_entropy(30 * (cosine - 0.3 * F.one_hot(labels[batch], 100)), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = _verification_accuracy(net, val, issame)
    print(f"untrained {untrained:.3f} trained {trained:.3f}")
    assert untrained < 0.72 and trained > 0.85 and trained - untrained > 0.2, (untrained, trained)


def test_config_synthetic_section_generates_the_heldout_folder(tmp_path):
    from largefr.config import Config, ConfigError
    from largefr.data.prepare import ensure_synthetic_data

    synthetic = {"identities": 3, "images_per_identity": 2, "val_pairs": 4, "seed": 2, "cache_dir": str(tmp_path / "c"),
                 "heldout_identities": 2, "heldout_images_per_identity": 3}
    config = Config.from_dict({"data": {"num_classes": 3, "num_images": 6, "image_size": 32, "synthetic": synthetic},
                               "train": {"batch_size": 2}, "output": str(tmp_path / "out")})
    ensure_synthetic_data(config.data, progress=False)
    meta = read_meta(tmp_path / "c")
    assert (meta["heldout_identities"], meta["heldout_images_per_identity"], meta["image_size"]) == (2, 3, 32)
    assert len(_heldout_files(tmp_path / "c")) == 6
    with pytest.raises(ConfigError, match="heldout_identities: must be 0 .no held-out folder. or >= 2"):
        Config.from_dict({"data": {"num_classes": 3, "num_images": 6, "synthetic": {**synthetic, "heldout_identities": 1}},
                          "train": {"batch_size": 2}, "output": str(tmp_path / "out")})
