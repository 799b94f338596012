"""tools/pack_rec.py: shards, labels, formats, byte-identical and resumable packs, bad files; its output (and
tools/make_synthetic.py's) read identically by DALI and the fallback."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data import build_loader, prepare_image_index
from largefr.data.pack_shards import PackResult, PackSettings, pack_shards
from largefr.data.recordio import IndexedRecordReader, read_property, read_property_file, unpack_header
from largefr.data.verification_bin import load_bin

FORMATS = {"a.jpg": "JPEG", "b.png": "PNG", "c.bmp": "BMP", "d.webp": "WEBP"}


def _write_image(path: str, seed: int, fmt: str, size: int = 112) -> None:
    coarse = np.random.default_rng(seed).integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    image.save(path, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))


@pytest.fixture
def image_tree(tmp_path) -> str:
    """Identity folders named so that sorted order differs from creation order; mixed formats."""
    root = tmp_path / "images"
    for seed, name in enumerate(["id_b", "id_a", "id_c"]):
        os.makedirs(root / name)
        for i, (file_name, fmt) in enumerate(FORMATS.items()):
            _write_image(str(root / name / file_name), 10 * seed + i, fmt)
    os.makedirs(root / ".hidden")  # not an identity
    (root / "id_a" / "notes.txt").write_text("not an image")
    return str(root)


def _run_tool(repo_root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/pack_rec.py", *args], cwd=repo_root, capture_output=True,
                          text=True, timeout=120)


def _check_formats(data: bytes, image_tree: str, name: str, file_name: str) -> None:
    assert data[:3] == b"\xff\xd8\xff"  # every record is a JPEG
    with open(os.path.join(image_tree, name, file_name), "rb") as f:
        original = f.read()
    if file_name.endswith(".jpg"):
        assert data == original  # JPEGs are stored untouched
    else:  # others re-encoded at quality 95: close to the source pixels
        source = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=np.float32)
        stored = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
        assert np.abs(source - stored).mean() < 3.0


def test_pack_rec_shards_layout_labels_and_formats(repo_root, image_tree, tmp_path):
    out = str(tmp_path / "rec")
    result = _run_tool(repo_root, "--images", image_tree, "--out", out, "--shard-images", "5", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "wrote 12 images of 3 identities in 3 shards" in result.stdout
    assert re.search(r"packed 12 images \(0 skipped\), identity 3/3 \(100.0%\), 3 shards done, [\d,]+ images/s, "
                     r"ETA 0m00s", result.stderr)
    assert read_property_file(out) == (3, 112, 112, 12)
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    assert manifest["complete"] and [s["images"] for s in manifest["shards"]] == [5, 5, 2]
    expected = [(label, name, file_name) for label, name in enumerate(["id_a", "id_b", "id_c"])  # sorted names
                for file_name in sorted(FORMATS)]
    key = 0
    for number, images in enumerate([5, 5, 2]):
        reader = IndexedRecordReader(os.path.join(out, f"train-{number:05d}.rec"))
        assert reader.image_keys() == list(range(key, key + images))  # keys global, contiguous, no header
        for k in reader.image_keys():
            label, name, file_name = expected[k]
            stored_label, data = reader.read_sample(k)
            assert stored_label == label
            _check_formats(data, image_tree, name, file_name)
        key += images


def test_pack_rec_single_file_keeps_insightface_layout(repo_root, image_tree, tmp_path):
    out = str(tmp_path / "rec")
    result = _run_tool(repo_root, "--images", image_tree, "--out", out, "--single-file")
    assert result.returncode == 0, result.stderr
    assert "packed 12/12 images" in result.stderr and "wrote 12 images of 3 identities" in result.stdout
    assert read_property(out) == (3, 112, 112)
    reader = IndexedRecordReader(os.path.join(out, "train.rec"))
    assert reader.image_keys() == list(range(1, 13))
    for label, name in enumerate(["id_a", "id_b", "id_c"]):  # labels follow sorted folder names
        flag, (first, end), *_ = unpack_header(reader.read(13 + label))
        assert flag == 2 and (first, end) == (1 + 4 * label, 5 + 4 * label)
        for key, file_name in zip(range(int(first), int(end)), sorted(FORMATS)):
            stored_label, data = reader.read_sample(key)
            assert stored_label == label
            _check_formats(data, image_tree, name, file_name)


def _assert_dali_equals_fallback(folder: str, num_classes: int, batch_size: int) -> int:
    batches = 0
    for world_size in (1, 2):
        for rank in range(world_size):
            options = dict(rec=folder, batch_size=batch_size, rank=rank, world_size=world_size,
                           num_classes=num_classes, shuffle=False, random_flip=False, num_workers=1)
            dali = list(build_loader("dali", device="cpu", **options))
            fallback = list(build_loader("torch", **options))
            assert len(dali) == len(fallback) > 0
            for (dali_images, dali_labels), (images, labels) in zip(dali, fallback):
                assert torch.equal(dali_labels, labels)
                assert torch.equal(dali_images, images)
                batches += 1
    return batches


def test_pack_rec_output_read_by_dali_equals_fallback(repo_root, image_tree, tmp_path):
    pytest.importorskip("nvidia.dali")
    for extra in (["--single-file"], ["--shard-images", "5"]):
        out = str(tmp_path / extra[0])
        assert _run_tool(repo_root, "--images", image_tree, "--out", out, *extra).returncode == 0
        assert _assert_dali_equals_fallback(out, num_classes=3, batch_size=4) == 3 + 2 * 1


def test_make_synthetic_output_read_by_dali_equals_fallback(repo_root, tmp_path):
    pytest.importorskip("nvidia.dali")
    out = str(tmp_path / "synth")
    result = subprocess.run([sys.executable, "tools/make_synthetic.py", "--out", out, "--identities", "6",
                             "--images-per-identity", "4", "--pairs", "4", "--seed", "0", "--quiet"],
                            cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert _assert_dali_equals_fallback(out, num_classes=6, batch_size=4) == 6 + 2 * 3
    images, issame = load_bin(os.path.join(out, "synth_val.bin"))
    assert len(images) == 2 * len(issame) == 8


def test_shuffled_pack_is_seeded(repo_root, image_tree, tmp_path):
    def labels_in_file_order(seed: str, run: str) -> list[float]:
        out = str(tmp_path / run)
        assert _run_tool(repo_root, "--images", image_tree, "--out", out, "--single-file", "--shuffle", "--seed",
                         seed).returncode == 0
        reader = IndexedRecordReader(os.path.join(out, "train.rec"))
        assert reader.keys == list(range(13))  # header and images only: no identity records
        return [reader.read_sample(k)[0] for k in reader.image_keys()]

    first, again, other = labels_in_file_order("1", "r1"), labels_in_file_order("1", "r2"), labels_in_file_order("2", "r3")
    assert first == again != other and sorted(first) == [0.0] * 4 + [1.0] * 4 + [2.0] * 4


def test_empty_folder_fails_naming_it(repo_root, tmp_path):
    os.makedirs(tmp_path / "empty")
    result = _run_tool(repo_root, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "empty: holds no identity sub-folders" in result.stderr
    os.makedirs(tmp_path / "empty" / "id0")
    result = _run_tool(repo_root, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "id0: identity folder holds no images" in result.stderr


def test_unreadable_image_fails_naming_it_or_is_skipped_and_counted(repo_root, image_tree, tmp_path):
    with open(os.path.join(image_tree, "id_c", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "rec"
    result = _run_tool(repo_root, "--images", image_tree, "--out", str(out), "--shard-images", "5")
    assert result.returncode != 0
    assert re.search(r"id_c/broken.jpg: unreadable image .*; fix or remove the file, or skip such files", result.stderr)
    assert not (out / "property").exists() and not list(out.glob("*.tmp"))
    assert not json.loads((out / "manifest.json").read_text())["complete"]  # finished shards kept for a resume
    result = _run_tool(repo_root, "--images", image_tree, "--out", str(tmp_path / "skip"), "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "skipping " in result.stderr and "id_c/broken.jpg: unreadable image" in result.stderr
    assert "wrote 12 images of 3 identities in 1 shards" in result.stdout and "1 unreadable files skipped" in result.stdout
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert manifest["skipped"] == 1 and manifest["shards"][0]["skipped"] == [os.path.join("id_c", "broken.jpg")]
    assert len(prepare_image_index(str(tmp_path / "skip"))) == 12


def test_single_file_unreadable_image_writes_nothing(repo_root, image_tree, tmp_path):
    with open(os.path.join(image_tree, "id_c", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "rec"
    result = _run_tool(repo_root, "--images", image_tree, "--out", str(out), "--single-file")
    assert result.returncode != 0
    assert "id_c/broken.jpg: unreadable image" in result.stderr
    assert not (out / "train.rec").exists() and not (out / "train.idx").exists()


def test_mixed_image_sizes_fail_naming_the_file(repo_root, image_tree, tmp_path):
    _write_image(os.path.join(image_tree, "id_b", "small.png"), 99, "PNG", size=96)
    result = _run_tool(repo_root, "--images", image_tree, "--out", str(tmp_path / "rec"))
    assert result.returncode != 0 and "id_b/small.png: image is 96x96 but the first image is 112x112" in result.stderr


def _files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_same_input_gives_the_same_bytes_whatever_the_workers(repo_root, image_tree, tmp_path):
    for workers in ("1", "3"):
        result = _run_tool(repo_root, "--images", image_tree, "--out", str(tmp_path / workers), "--shard-bytes", "20K",
                           "--workers", workers)
        assert result.returncode == 0, result.stderr
    assert _files(tmp_path / "1") == _files(tmp_path / "3") and len(_files(tmp_path / "1")) > 4


class _Stop(Exception):
    pass


def _pack(image_tree: str, out, stop_after: int | None = None, workers: int = 1) -> PackResult:
    def on_shard(entry: dict) -> None:
        if stop_after is not None and int(entry["name"].split("-")[1]) + 1 == stop_after:
            raise _Stop

    return pack_shards(image_tree, str(out), settings=PackSettings(shard_images=3), workers=workers, progress=None,
                       on_shard=on_shard)


def test_resumed_pack_equals_an_uninterrupted_one(image_tree, tmp_path):
    _pack(image_tree, tmp_path / "whole")
    with pytest.raises(_Stop):
        _pack(image_tree, tmp_path / "resumed", stop_after=2, workers=2)
    assert sorted(os.listdir(tmp_path / "resumed")) == ["manifest.json"] + [
        f"train-0000{n}.{ext}" for n in range(2) for ext in ("idx", "rec")]  # no property, no partial shard
    kept = {n: os.stat(tmp_path / "resumed" / f"train-0000{n}.rec").st_mtime_ns for n in range(2)}
    (tmp_path / "resumed" / "train-00002.rec.tmp").write_bytes(b"left by a killed run")
    result = _pack(image_tree, tmp_path / "resumed")
    assert result.reused_shards == 2 and result.num_shards == 4 and result.num_images == 12
    assert {n: os.stat(tmp_path / "resumed" / f"train-0000{n}.rec").st_mtime_ns for n in range(2)} == kept
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")
    assert _pack(image_tree, tmp_path / "resumed").reused_shards == 4  # complete and unchanged: nothing to do


def test_changed_input_repacks_from_the_first_changed_shard(image_tree, tmp_path):
    _pack(image_tree, tmp_path / "out")
    first = [os.stat(tmp_path / "out" / f"train-0000{n}.rec").st_mtime_ns for n in range(2)]
    _write_image(os.path.join(image_tree, "id_b", "e.jpg"), 77, "JPEG")  # image 8 of 13: shard 2 (images 6..8)
    result = _pack(image_tree, tmp_path / "out")
    assert result.reused_shards == 2 and result.num_images == 13
    assert [os.stat(tmp_path / "out" / f"train-0000{n}.rec").st_mtime_ns for n in range(2)] == first
    _pack(image_tree, tmp_path / "fresh")
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")
    os.makedirs(os.path.join(image_tree, "id_d"))  # a new identity after a complete pack: the last shard again
    _write_image(os.path.join(image_tree, "id_d", "a.jpg"), 78, "JPEG")
    assert _pack(image_tree, tmp_path / "out").num_classes == 4
    _pack(image_tree, tmp_path / "fresh2")
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh2")
