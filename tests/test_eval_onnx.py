"""ONNX export: the input/output contract, and onnxruntime equal to torch to 1e-4 on random and synthetic images."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from largefr.data.verification_bin import decode_pairs, load_bin
from largefr.eval.onnx_export import export_onnx, max_abs_difference, onnx_embeddings, onnx_metadata
from largefr.eval.weights import load_backbone
from largefr.models import get_model
from tests.eval_fixtures import EMBEDDING_SIZE, load_tool, quickstart_checkpoint, synthetic_data

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
TOLERANCE = 1e-4


def synthetic_images(count: int) -> torch.Tensor:
    images, _ = load_bin(os.path.join(synthetic_data(), "synth_val.bin"))
    return decode_pairs(images[:count], 112)


def random_images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def calibrated(network: str) -> torch.nn.Module:
    """Random weights with BatchNorm statistics measured on synthetic faces: embeddings of order 1.

    With the initial statistics (mean 0, variance 1) a deep IResNet's outputs reach ~1e7, where a
    1e-4 absolute tolerance means nothing.
    """
    torch.manual_seed(0)
    return calibrated_model(get_model(network, embedding_size=512))


def calibrated_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its BatchNorm statistics measured on 16 synthetic faces, in eval mode."""
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        norm.reset_running_stats()
        norm.momentum = None
    with torch.no_grad():
        model.train()(synthetic_images(16))
    return model.eval()


@pytest.mark.parametrize("source", ["checkpoint", "weights"])
def test_export_tool_on_quickstart_model(tmp_path, source, capsys):
    import onnx

    checkpoint = quickstart_checkpoint()
    path = checkpoint.root if source == "checkpoint" else checkpoint.weights
    out = str(tmp_path / "model.onnx")
    bin_path = os.path.join(synthetic_data(), "synth_val.bin")
    status = load_tool("export_onnx").main([f"--{source}", path, "--out", out, "--bins", bin_path])
    assert status == 0, capsys.readouterr().err  # includes the tool's own 1e-4 parity check
    assert "max |diff|" in capsys.readouterr().out
    graph = onnx.load(out).graph
    assert [i.name for i in graph.input] == ["data"] and [o.name for o in graph.output] == ["embedding"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]  # dynamic batch
    assert onnx_metadata(out)["normalization"] == "(pixel - 127.5) / 127.5"
    if source == "checkpoint":
        return  # the raw short run's embeddings are ~0.02 (eval_fixtures.py): compare on the calibrated one
    model = load_backbone(weights=path).model
    for images in (synthetic_images(5), random_images(1), random_images(3, seed=1)):
        with torch.no_grad():
            reference = model(images).numpy()
        assert np.abs(reference).max() > 0.1  # embeddings of order 1: the tolerance is meaningful
        result = onnx_embeddings(out, images)
        assert result.shape == (images.shape[0], EMBEDDING_SIZE)
        np.testing.assert_allclose(result, reference, rtol=0, atol=TOLERANCE)


def _parity(network: str, tmp_path) -> None:
    model = calibrated(network)
    path = str(tmp_path / f"{network}.onnx")
    export_onnx(model, path)
    for images in (random_images(2), synthetic_images(4)):
        with torch.no_grad():
            assert np.abs(model(images).numpy()).max() > 0.1
        assert max_abs_difference(model, path, images) <= TOLERANCE


def test_r18_parity(tmp_path):
    _parity("r18", tmp_path)


@pytest.mark.slow
def test_r100_parity(tmp_path):
    _parity("r100", tmp_path)


def test_vit_parity(tmp_path):
    """A small ViT (same modules as vit_t/s/b/l: attention, patch embedding, feature head): onnxruntime = torch."""
    from largefr.models.vit import VisionTransformer

    torch.manual_seed(0)
    model = calibrated_model(VisionTransformer(width=32, depth=2, embedding_size=64, mask_ratio=0.1))
    path = str(tmp_path / "vit.onnx")
    export_onnx(model, path)
    for images in (random_images(2), synthetic_images(3)):
        with torch.no_grad():
            assert np.abs(model(images).numpy()).max() > 0.1
        assert max_abs_difference(model, path, images) <= TOLERANCE


@pytest.mark.slow
def test_vit_t_export_tool_parity(tmp_path, capsys):
    """tools/export_onnx.py on an arcface_torch-sized vit_t backbone file (112 px, 512-d)."""
    model = calibrated("vit_t")
    weights, out = str(tmp_path / "backbone.pth"), str(tmp_path / "vit_t.onnx")
    torch.save(model.state_dict(), weights)
    bin_path = os.path.join(synthetic_data(), "synth_val.bin")
    assert load_tool("export_onnx").main(["--weights", weights, "--out", out, "--bins", bin_path]) == 0
    assert "vit_t, input 'data' Nx3x112x112" in capsys.readouterr().out
    assert max_abs_difference(model, out, random_images(2)) <= TOLERANCE


def test_missing_extra_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "largefr\[eval\]"'):
        export_onnx(torch.nn.Identity(), str(tmp_path / "x.onnx"))


def _large_norm_weights(tmp_path) -> tuple[torch.nn.Module, str]:
    """A small model whose embeddings have norms ~1e6 (its last BatchNorm scaled; unscaled they are ~1e-5):
    float rounding alone makes raw differences far above 1e-4."""
    torch.manual_seed(0)
    model = get_model("mbf", embedding_size=8, image_size=112).eval()
    with torch.no_grad():
        last_norm = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]
        last_norm.weight.mul_(1e11)
    path = str(tmp_path / "model.pt")
    torch.save(model.state_dict(), path)
    return model, path


def test_parity_is_judged_on_normalized_embeddings(tmp_path, capsys):
    model, weights = _large_norm_weights(tmp_path)
    out = str(tmp_path / "model.onnx")
    assert load_tool("export_onnx").main(["--weights", weights, "--out", out]) == 0, capsys.readouterr().err
    images = random_images(4)
    with torch.no_grad():
        assert model(images).norm(dim=1).min() > 1e5
    assert max_abs_difference(model, out, images) > TOLERANCE  # the raw check would refuse this model
    assert "L2-normalized embeddings; raw" in capsys.readouterr().out
    with torch.no_grad():
        model.features.layers[2].weight.mul_(-1)  # a real difference is still caught
    from largefr.eval.onnx_export import normalized_difference

    assert normalized_difference(model, out, images) > 0.1


def test_exported_model_loads_in_insightface_arcface_onnx(tmp_path):
    """insightface's own inference class (INSIGHTFACE_SRC: an unpacked insightface wheel) reads the export."""
    if os.environ.get("INSIGHTFACE_SRC"):
        sys.path.insert(0, os.environ["INSIGHTFACE_SRC"])
    try:
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    except Exception as error:  # noqa: BLE001 - any missing dependency of insightface (cv2, skimage, ...)
        pytest.skip(f"insightface's ArcFaceONNX is not importable here ({type(error).__name__}: {error})")
    model, weights = _large_norm_weights(tmp_path)
    out = str(tmp_path / "model.onnx")
    export_onnx(model, out)
    recognizer = ArcFaceONNX(model_file=out)
    assert (recognizer.input_mean, recognizer.input_std) == (127.5, 127.5)  # its normalization is ours
    assert recognizer.input_size == (112, 112) and recognizer.output_names == ["embedding"]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    ours = torch.nn.functional.normalize(model(torch.from_numpy((pixels - 127.5) / 127.5)), dim=1).detach().numpy()
    theirs = recognizer.forward(pixels)
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=TOLERANCE)
