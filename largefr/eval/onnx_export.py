"""Export a backbone to ONNX and check onnxruntime against torch.

The model: input `data`, float32 N x 3 x 112 x 112 (N dynamic), RGB, normalized as in training:
`(pixel - 127.5) / 127.5` (so values in [-1, 1]); output `embedding`, float32 N x d, raw (not
L2-normalized; normalize it before taking cosine similarities), so the parity check compares the
L2-normalized embeddings (`normalized_difference`). insightface's ArcFaceONNX reads such a file as
it is: no Sub/Mul node at the start of the graph makes it normalize pixels with 127.5 / 127.5 itself. The same contract is written into
the file's metadata (`normalization`, `color`, `network`, `embedding_size`). Exported with torch's
TorchScript-based exporter (`dynamo=False`), which needs only the `onnx` package, in eval mode
(BatchNorm uses its running statistics, dropout is off).
onnx and onnxruntime are optional extras: `pip install "largefr[eval]"`.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from largefr.errors import MissingExtraError

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 17
NORMALIZATION = "(pixel - 127.5) / 127.5"


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise MissingExtraError(f'ONNX export needs {module}: pip install "largefr[eval]" (or pip install onnx onnxruntime)') \
            from None


def export_onnx(model: nn.Module, out_path: str, *, image_size: int = 112, opset: int = DEFAULT_OPSET,
                metadata: dict[str, str] | None = None) -> None:
    """Write `model` (on CPU, float32, eval mode) to `out_path` with a dynamic batch; checked by onnx."""
    onnx = _require("onnx")
    model = model.float().cpu().eval()
    example = torch.zeros(1, 3, image_size, image_size)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        proto = onnx.load(tmp)
        contract = {"normalization": NORMALIZATION, "color": "RGB", "layout": "NCHW",
                    "input_size": f"{image_size}x{image_size}", **(metadata or {})}
        for key, value in contract.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def onnx_metadata(path: str) -> dict[str, str]:
    onnx = _require("onnx")
    return {entry.key: entry.value for entry in onnx.load(path).metadata_props}


def onnx_embeddings(path: str, images: np.ndarray | torch.Tensor) -> np.ndarray:
    """onnxruntime (CPU) output for float32 N x 3 x H x W normalized images."""
    onnxruntime = _require("onnxruntime")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = np.ascontiguousarray(torch.as_tensor(images).numpy(), dtype=np.float32)
    return session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]


@torch.no_grad()
def normalized_difference(model: nn.Module, path: str, images: np.ndarray | torch.Tensor) -> float:
    """max |onnxruntime - torch| over the L2-normalized embeddings of `images`: what a user compares
    (cosine similarities), so float rounding on embeddings of large norm is not mistaken for a difference."""
    model = model.float().cpu().eval()
    reference = torch.nn.functional.normalize(model(torch.as_tensor(images, dtype=torch.float32)), dim=1)
    exported = torch.nn.functional.normalize(torch.from_numpy(onnx_embeddings(path, images)), dim=1)
    return float((exported - reference).abs().max())


@torch.no_grad()
def max_abs_difference(model: nn.Module, path: str, images: np.ndarray | torch.Tensor) -> float:
    """max |onnxruntime - torch| over the embeddings of `images` (torch on CPU, float32, eval mode)."""
    model = model.float().cpu().eval()
    reference = model(torch.as_tensor(images, dtype=torch.float32)).numpy()
    return float(np.abs(onnx_embeddings(path, images) - reference).max())
