"""Training augmentation: the sampling rules and constants both loaders share (data.augment).

The operators, their probabilities and ranges are declared in largefr.config.AugmentConfig and run in
the order of AUGMENT_OPERATORS. Each loader draws, per image and operator, a coin with the
operator's probability and, when it lands, the operator's parameters from uniforms u in [0, 1):
the DALI loader with DALI's random operators inside its pipeline (largefr/data/augment_dali.py),
the torch loader with a numpy generator per image (largefr/data/augment_torch.py). Both turn the
uniforms into parameters with the functions below (written once, over either numpy or DALI's
math), so the parameter distributions are the same, but the two loaders draw different values
(their generators differ), so batches are not bit-identical. Given the same parameters, grayscale,
brightness/contrast, hue/saturation, blur, the mask and JPEG agree to 1 intensity level
(tests/test_augment.py::test_both_loaders_apply_the_same_operator); the two resamplers of the crop
and the low-resolution copy differ by a fraction of a level on average; DALI's crop operator draws
its box itself, by the rule crop_box documents.

Seeds: the DALI pipeline of (train.seed, epoch, rank) draws everything, and a resume re-runs the
epoch's first batches (DaliRecLoader.skip); the torch loader seeds each image's generator from
(train.seed, epoch, rank, position in the epoch). Either way a resumed run replays the same
augmentations as the uninterrupted one.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np

from largefr.choices import AUGMENT_OPERATORS
from largefr.config import AugmentConfig

__all__ = ["AUGMENT_OPERATORS", "ARCFACE_TORCH_LIKE", "AugmentConfig", "CONTRAST_CENTER", "CROP_ATTEMPTS",
           "GRAY_WEIGHTS", "NUMPY_MATH", "blur_window", "erase_box", "hsv_matrix", "log_uniform", "mask_box",
           "uniform", "arcface_torch_like"]

ARCFACE_TORCH_LIKE: dict[str, Any] = {
    "downscale_prob": 0.1, "downscale_range": [0.5, 0.8],
    "blur_prob": 0.2, "blur_sigma": [0.8, 1.1],
    "jitter_prob": 0.2, "hue": [0.0, 20.0], "saturation": [1.0, 1.2],
    "grayscale_prob": 0.1,
}
"""data.augment fields that reproduce insightface arcface_torch's `dali_aug` (its low-resolution resize,
blur with windows 3-5, HSV jitter and grayscale, each with its probability); the flip is data.random_flip."""

CROP_ATTEMPTS = 10
"""Draws of a crop box before falling back to the whole image (DALI's random_resized_crop default)."""
CONTRAST_CENTER = 128.0
"""Intensity the contrast factor pivots on (DALI's brightness_contrast default for uint8)."""
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""Luma weights of R, G, B in the grayscale operator (ITU-R BT.601, as DALI's RGB -> GRAY)."""
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])

NUMPY_MATH = SimpleNamespace(sqrt=np.sqrt, min=np.minimum, exp=np.exp)
"""The math the sampling rules use, for numpy inputs (augment_dali passes nvidia.dali.math)."""


def arcface_torch_like(**overrides: Any) -> AugmentConfig:
    """The AugmentConfig of ARCFACE_TORCH_LIKE, with `overrides`."""
    return AugmentConfig(**{**ARCFACE_TORCH_LIKE, **overrides})


def uniform(u, bounds: list[float]):
    """A draw uniform in [low, high] from u uniform in [0, 1)."""
    low, high = float(bounds[0]), float(bounds[1])
    return low + u * (high - low)


def log_uniform(u, bounds: list[float], m=NUMPY_MATH):
    """A draw log-uniform in [low, high] (aspect ratios: 1/2 as likely as 2) from u uniform in [0, 1)."""
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return m.exp(low + u * (high - low))


def erase_box(u_area, u_ratio, u_top, u_left, augment: AugmentConfig, m=NUMPY_MATH):
    """(top, left, height, width) of the erased rectangle, as shares of the image height and width.

    Area and ratio are drawn from erase_area and erase_ratio (log-uniform); a side longer than the
    image is cut to the image, then the rectangle is placed uniformly inside it.
    """
    area, ratio = uniform(u_area, augment.erase_area), log_uniform(u_ratio, augment.erase_ratio, m)
    height = m.min(m.sqrt(area / ratio), 1.0)
    width = m.min(m.sqrt(area * ratio), 1.0)
    return u_top * (1.0 - height), u_left * (1.0 - width), height, width


def mask_box(u_top, u_width, augment: AugmentConfig):
    """(top, left, height, width) of the face-mask rectangle, as shares: centered, down to the bottom edge."""
    top, width = uniform(u_top, augment.mask_top), uniform(u_width, augment.mask_width)
    return top, (1.0 - width) * 0.5, 1.0 - top, width


def crop_box(rng: np.random.Generator, height: int, width: int, augment: AugmentConfig) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) in pixels of a random resized crop.

    DALI's random_resized_crop rule (torchvision's too): up to CROP_ATTEMPTS draws of an area share
    (crop_scale) and a log-uniform aspect ratio (crop_ratio) until the box fits, placed uniformly;
    else the largest centered box whose aspect ratio is clamped into crop_ratio.
    """
    for _ in range(CROP_ATTEMPTS):
        area = uniform(rng.random(), augment.crop_scale) * height * width
        ratio = log_uniform(rng.random(), augment.crop_ratio)
        box_w, box_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < box_w <= width and 0 < box_h <= height:
            return int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1)), box_h, box_w
    ratio = min(max(width / height, augment.crop_ratio[0]), augment.crop_ratio[1])
    box_w, box_h = (width, round(width / ratio)) if ratio > width / height else (round(height * ratio), height)
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def blur_window(sigma: float) -> int:
    """Kernel diameter of a Gaussian blur of `sigma` pixels: 2 * ceil(3 sigma) + 1 (DALI's default)."""
    return 2 * math.ceil(3.0 * sigma) + 1


def hsv_matrix(hue_degrees: float, saturation: float) -> np.ndarray:
    """3x3 matrix M (out = M @ rgb) of a hue rotation and saturation scaling about the gray axis.

    The linear approximation of DALI's hsv operator: RGB to YIQ, rotate the chroma plane (I, Q) by
    the hue and scale it by the saturation, back to RGB (matches DALI to 1e-6).
    """
    angle = math.radians(hue_degrees)
    cos, sin = saturation * math.cos(angle), saturation * math.sin(angle)
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, cos, sin], [0.0, -sin, cos]])
    return np.linalg.inv(_RGB_TO_YIQ) @ chroma @ _RGB_TO_YIQ
