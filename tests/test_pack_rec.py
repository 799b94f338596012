"""tools/pack_rec.py (and tools/make_synthetic.py output) read identically by DALI and the fallback."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data import build_loader
from largefr.data.recordio import IndexedRecordReader, read_property, unpack_header
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


def test_pack_rec_layout_labels_and_formats(repo_root, image_tree, tmp_path):
    out = str(tmp_path / "rec")
    result = _run_tool(repo_root, "--images", image_tree, "--out", out)
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
            assert stored_label == label and data[:3] == b"\xff\xd8\xff"  # every record is a JPEG
            with open(os.path.join(image_tree, name, file_name), "rb") as f:
                original = f.read()
            if file_name.endswith(".jpg"):
                assert data == original  # JPEGs are stored untouched
            else:  # others re-encoded at quality 95: close to the source pixels
                source = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=np.float32)
                stored = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
                assert np.abs(source - stored).mean() < 3.0


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
    out = str(tmp_path / "rec")
    assert _run_tool(repo_root, "--images", image_tree, "--out", out).returncode == 0
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
        assert _run_tool(repo_root, "--images", image_tree, "--out", out, "--shuffle", "--seed", seed).returncode == 0
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


def test_unreadable_image_fails_naming_it_and_writes_nothing(repo_root, image_tree, tmp_path):
    with open(os.path.join(image_tree, "id_c", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "rec"
    result = _run_tool(repo_root, "--images", image_tree, "--out", str(out))
    assert result.returncode != 0
    assert "id_c/broken.jpg: unreadable image" in result.stderr
    assert not (out / "train.rec").exists() and not (out / "train.idx").exists()


def test_mixed_image_sizes_fail_naming_the_file(repo_root, image_tree, tmp_path):
    _write_image(os.path.join(image_tree, "id_b", "small.png"), 99, "PNG", size=96)
    result = _run_tool(repo_root, "--images", image_tree, "--out", str(tmp_path / "rec"))
    assert result.returncode != 0 and "id_b/small.png: image is 96x96 but the first image is 112x112" in result.stderr
