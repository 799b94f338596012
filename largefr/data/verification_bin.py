"""insightface verification files (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...).

A .bin is a pickle of `(bins, issame_list)`: `bins` holds the encoded images (two per pair, pair i
is images 2i and 2i+1), `issame_list` one bool per pair. insightface wrote them from Python 2, so
Python 3 reads them with `encoding="bytes"`. A pickle can name any callable, so reading one from
an untrusted download must not use `pickle.load`: `load_bin` uses an unpickler that resolves only
the few globals these files can contain and refuses everything else before it runs.
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence

import numpy as np
import torch

from largefr.errors import UserError


class VerificationBinError(UserError):
    """A .bin file is unreadable or holds something other than (images, issame)."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol <= 2, refusing anything else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


# (module, name) -> what the name resolves to. Only constructors of plain data: bytes, uint8/bool
# numpy arrays and scalars (some re-packed .bin files store images or flags as numpy objects).
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct
_NUMPY_SCALAR = np.bool_(True).__reduce__()[0]  # numpy(._)core.multiarray.scalar
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        resolved = _ALLOWED_GLOBALS.get((module, name))
        if resolved is None:
            raise VerificationBinError(
                f"{self.path}: refused to load global '{module}.{name}': a verification .bin holds only "
                "images and bools, so this file is not one (or was tampered with); nothing of it was run")
        return resolved


def _as_image_bytes(item: object, index: int, path: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise VerificationBinError(f"{path}: image {index} is a {type(item).__name__}, expected encoded image bytes")


def _as_bool(item: object, index: int, path: str) -> bool:
    if isinstance(item, (bool, np.bool_)):
        return bool(item)
    raise VerificationBinError(f"{path}: issame entry {index} is a {type(item).__name__}, expected a bool")


def load_bin(path: str) -> tuple[list[bytes], list[bool]]:
    """(encoded images, issame per pair) of an insightface .bin, read with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            loaded = _RestrictedUnpickler(f, path).load()
    except VerificationBinError:
        raise
    except FileNotFoundError:
        raise VerificationBinError(f"{path}: no such verification file") from None
    except Exception as err:  # truncated or garbage pickles raise many types
        raise VerificationBinError(f"{path}: not a readable verification .bin ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise VerificationBinError(f"{path}: expected a pickled (images, issame) pair, got {type(loaded).__name__}")
    bins, issame = loaded
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise VerificationBinError(f"{path}: expected lists of images and of bools")
    images = [_as_image_bytes(item, i, path) for i, item in enumerate(bins)]
    flags = [_as_bool(item, i, path) for i, item in enumerate(issame)]
    if len(images) != 2 * len(flags):
        raise VerificationBinError(f"{path}: {len(images)} images for {len(flags)} pairs; expected two per pair")
    return images, flags


def write_bin(path: str, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface-compatible .bin (pickle of (list of bytes, list of bool)), atomically."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; expected two images per pair")
    payload = ([bytes(image) for image in images], [bool(flag) for flag in issame])
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=4)
    os.replace(tmp, path)


def decode_image(data: bytes, image_size: int, where: str) -> np.ndarray:
    """H x W x 3 uint8 RGB of one encoded image, resized to image_size if needed."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except Exception as err:
        raise VerificationBinError(f"{where}: undecodable image ({type(err).__name__}: {err})") from None


def decode_pairs(images: Sequence[bytes], image_size: int = 112, *, source: str = "verification set") -> torch.Tensor:
    """float32 N x 3 x H x W, RGB, normalized to (x - 127.5) / 127.5, as the training loaders give."""
    batch = np.stack([decode_image(data, image_size, f"{source} image {i}") for i, data in enumerate(images)])
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    return tensor.sub_(127.5).mul_(1 / 127.5).contiguous()  # as the loaders compute it
