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
    model = get_model(network, embedding_size=512)
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
    status = load_tool("export_onnx").main([f"--{source}", path, "--out", out, "--check-bin", bin_path])
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


def test_missing_extra_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "largefr\[eval\]"'):
        export_onnx(torch.nn.Identity(), str(tmp_path / "x.onnx"))
