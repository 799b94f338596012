"""One image-size rule across the evaluation and export tools, on a real 32 px MobileFaceNet and real 112 px
files: .bin images are resized with one line, IJB crops aligned at the model's size with one line, a folder of
crops of another size refused naming both sizes and --resize (and resized with it); never a traceback."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data.verification_bin import write_bin
from largefr.eval.image_size import ImageSizeError, check_crop_size
from largefr.models import get_model
from tests.eval_fixtures import load_tool
from tests.test_eval_ijb import _write_fixture

MODEL_SIZE = 32


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> str:
    """A 32 px MobileFaceNet's state_dict, as tools/export_backbone.py writes one (the size is in its shapes)."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weights") / "mbf32.pt")
    torch.save(get_model("mbf", embedding_size=16, image_size=MODEL_SIZE).state_dict(), path)
    return path


def _png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_bin_of_112_px_faces_is_resized_with_one_line(small_weights, tmp_path, capsys):
    path = str(tmp_path / "faces112.bin")
    write_bin(path, [_png(112, seed) for seed in range(40)], [pair % 2 == 0 for pair in range(20)])
    assert load_tool("eval_verification").main(["--weights", small_weights, "--bins", path]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"{path}: 112x112 images resized to the model's input size 32x32"]


def test_ijb_crops_are_aligned_at_the_models_size(small_weights, tmp_path, capsys):
    _write_fixture(str(tmp_path / "IJBC"))
    code = load_tool("eval_ijb").main(["--weights", small_weights, "--ijb-root", str(tmp_path / "IJBC"), "--target",
                                       "IJBC", "--roc", str(tmp_path / "roc.png"), "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "IJBC: loose crops aligned at the model's input size 32x32 (the ArcFace 112x112 template scaled)" \
        in captured.err
    assert "Traceback" not in captured.err and "AUC" in captured.out


def test_embed_refuses_crops_of_another_size_naming_both_and_resizes_with_the_flag(small_weights, tmp_path, capsys):
    folder = tmp_path / "faces"
    for identity in range(2):
        (folder / f"id{identity}").mkdir(parents=True)
        for n in range(2):
            (folder / f"id{identity}" / f"{n}.png").write_bytes(_png(112, 10 * identity + n))
    args = ["--weights", small_weights, "--images", str(folder), "--out", str(tmp_path / "emb.npy")]
    assert load_tool("embed").main(args) == 2
    first = folder / "id0" / "0.png"
    assert capsys.readouterr().err.strip() == (
        f"embed: error: {first}: 112x112 pixels, but the model takes 32x32; pass --resize to resize aligned crops "
        "to the model's size")
    assert load_tool("embed").main([*args, "--resize"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"{folder}: 112x112 images (--resize) resized to the model's input size 32x32"]
    assert np.load(tmp_path / "emb.npy").shape == (4, 16)


def test_a_crop_that_is_not_square_is_refused_even_with_resize():
    with pytest.raises(ImageSizeError, match=r"a.png: 112x96 pixels is not a square aligned face crop; align it"):
        check_crop_size("a.png", (112, 96), 32, resize=True)
    assert check_crop_size("a.png", (32, 32), 32, resize=False) is False
