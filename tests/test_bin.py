"""insightface verification .bin files: round trip, legacy pickles, and refusing pickled callables."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data.torch_loader import decode_rgb, normalize_image
from largefr.data.verification_bin import VerificationBinError, decode_pairs, load_bin, write_bin


def _jpeg(seed: int, size: int = 112) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_round_trip(tmp_path):
    images, issame = [_jpeg(i) for i in range(6)], [True, False, True]
    path = str(tmp_path / "lfw.bin")
    write_bin(path, images, issame)
    assert load_bin(path) == (images, issame)
    # the file is what insightface's own reader expects: pickle.load(..., encoding='bytes')
    with open(path, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert bins == images and issame_list == issame


def test_reads_python2_era_and_numpy_variants(tmp_path):
    images = [_jpeg(0), _jpeg(1)]
    path = str(tmp_path / "old.bin")
    # protocol 2 from Python 3 stores bytes through _codecs.encode; numpy types appear in re-packed files
    variants = [(images, [True]), ([np.frombuffer(images[0], np.uint8), images[1]], [np.bool_(False)]),
                (tuple(images), np.array([True]))]
    for bins, issame in variants:
        with open(path, "wb") as f:
            pickle.dump((bins, issame), f, protocol=2)
        loaded_images, loaded_issame = load_bin(path)
        assert loaded_images == images and loaded_issame == [bool(x) for x in issame]


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').mkdir('pwned')",)


@pytest.mark.parametrize("payload_kind", ["os.system", "builtins.eval"])
def test_pickled_callable_is_refused_and_not_run(tmp_path, payload_kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    evil = _RunsShell(f"touch {marker}") if payload_kind == "os.system" else _CallsEval()
    path = str(tmp_path / "evil.bin")
    with open(path, "wb") as f:
        pickle.dump(([evil, _jpeg(0)], [True]), f, protocol=2)
    with pytest.raises(VerificationBinError, match=r"evil.bin: refused to load global '(posix|__builtin__)\.(system|eval)'"):
        load_bin(path)
    assert not marker.exists()
    # the same file DOES run code under plain pickle: the test payload is real
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_truncated_and_malformed_files(tmp_path):
    path = str(tmp_path / "cut.bin")
    write_bin(path, [_jpeg(0), _jpeg(1)], [True])
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(VerificationBinError, match=r"cut.bin: not a readable verification .bin"):
        load_bin(path)
    with open(path, "wb") as f:
        pickle.dump(([b"a", b"b", b"c"], [True]), f)
    with pytest.raises(VerificationBinError, match=r"cut.bin: 3 images for 1 pairs"):
        load_bin(path)
    with open(path, "wb") as f:
        pickle.dump(([b"a", 7], [True]), f)
    with pytest.raises(VerificationBinError, match=r"cut.bin: image 1 is a int"):
        load_bin(path)
    with pytest.raises(VerificationBinError, match=r"missing.bin: no such verification file"):
        load_bin(str(tmp_path / "missing.bin"))


def test_decode_pairs_matches_training_normalization():
    images = [_jpeg(3), _jpeg(4)]
    batch = decode_pairs(images)
    assert batch.shape == (2, 3, 112, 112) and batch.dtype == torch.float32
    for i, data in enumerate(images):
        assert torch.equal(batch[i], normalize_image(decode_rgb(data), flip=False))
    assert -1.0 <= batch.min() and batch.max() <= 1.0
    resized = decode_pairs([_jpeg(5, size=96)], image_size=112)
    assert resized.shape == (1, 3, 112, 112)
    with pytest.raises(VerificationBinError, match=r"lfw image 1: undecodable image"):
        decode_pairs([images[0], b"\xff\xd8\xffnot a jpeg"], source="lfw")
