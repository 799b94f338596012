"""One rule for image sizes in the evaluation and export tools.

A model knows its input size: the shapes of its weights imply it (`largefr.eval.weights` infers it when
loading an exported backbone or a checkpoint, and `image_size_of` reads it off the built model). Images of
another size are never fed as they are:

* verification .bin files (aligned faces, 112 px by insightface's convention): resized to the model's
  size, with one line per file saying so (eval_verification, plot_similarity, export_onnx --bins);
* IJB loose crops: aligned straight to the model's size (the ArcFace template scaled), one line;
* a folder of aligned crops (embed): refused with one message naming both sizes and RESIZE_FLAG (a folder
  may hold unaligned photos, which resizing would not fix); with RESIZE_FLAG resized, one line.
"""
from __future__ import annotations

import io
import sys
from typing import Sequence

from torch import nn

from largefr.errors import UserError

RESIZE_FLAG = "--resize"
DEFAULT_IMAGE_SIZE = 112
"""insightface's aligned crop side, assumed for a model that does not say its own."""


class ImageSizeError(UserError, ValueError):
    """Images of another size than the model takes, where the tool does not resize without being asked."""


def image_size_of(model: nn.Module) -> int:
    """The input side the model was built for (largefr's backbones keep it as `image_size`)."""
    return int(getattr(model, "image_size", DEFAULT_IMAGE_SIZE))


def encoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


def say_resized(what: str, found: tuple[int, int], model_size: int, how: str = "resized to") -> None:
    """The one line a tool prints when it fits images of size `found` to the model's input."""
    print(f"{what}: {found[0]}x{found[1]} images {how} the model's input size {model_size}x{model_size}",
          file=sys.stderr, flush=True)


def announce_bin_resize(path: str, images: Sequence[bytes], model_size: int) -> None:
    """One line when the .bin's images (judged by the first) are not the model's size: they get resized."""
    if len(images):
        found = encoded_size(images[0])
        if found != (model_size, model_size):
            say_resized(path, found, model_size)


def check_crop_size(path: str, found: tuple[int, int], model_size: int, *, resize: bool) -> bool:
    """True when the crop at `path` must be resized; ImageSizeError when it may not be (no RESIZE_FLAG)."""
    if found == (model_size, model_size):
        return False
    if found[0] != found[1]:
        raise ImageSizeError(f"{path}: {found[0]}x{found[1]} pixels is not a square aligned face crop; align it "
                             "first (largefr.eval.align), then embed")
    if not resize:
        raise ImageSizeError(f"{path}: {found[0]}x{found[1]} pixels, but the model takes {model_size}x{model_size}; "
                             f"pass {RESIZE_FLAG} to resize aligned crops to the model's size")
    return True
