"""data.augment for the torch loader: the operators of largefr/data/augment.py in numpy and plain torch.

Works on one H x W x 3 uint8 RGB image with its own numpy generator (seeded by the loader per image)
and rounds to uint8 after every operator, as DALI's uint8 operators do. No torchvision: resizing is
torch's bilinear interpolate with antialiasing, the blur a separable Gaussian with mirrored
borders, the JPEG round trip PIL's (libjpeg-turbo).
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from largefr.data.augment import (CONTRAST_CENTER, GRAY_WEIGHTS, AugmentConfig, blur_window, crop_box, erase_box,
                                  hsv_matrix, mask_box, uniform)


def _to_uint8(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    pixels = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of an H x W x 3 uint8 image."""
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    out = F.interpolate(chw, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return _to_uint8(out[0].permute(1, 2, 0))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, augment: AugmentConfig) -> np.ndarray:
    top, left, box_h, box_w = crop_box(rng, image.shape[0], image.shape[1], augment)
    return resize(image[top:top + box_h, left:left + box_w], image.shape[0], image.shape[1])


def downscale(image: np.ndarray, rng: np.random.Generator, augment: AugmentConfig) -> np.ndarray:
    height, width = image.shape[:2]
    share = uniform(rng.random(), augment.downscale_range)
    small = resize(image, max(1, round(share * height)), max(1, round(share * width)))
    return resize(small, height, width)


def pixel_edge(share: float, size: int) -> int:
    """Pixel index of an edge at `share` of `size`: rounded down, as DALI's erase with normalized coordinates
    (the 1e-4 keeps an edge at exactly 1.0 from falling a pixel short through float error)."""
    return int(math.floor(share * size + 1e-4))


def fill_box(image: np.ndarray, box: tuple[float, float, float, float], color: list[int]) -> np.ndarray:
    """`image` with the box (top, left, height, width as shares of the image) set to `color`."""
    height, width = image.shape[:2]
    top, left, box_h, box_w = (float(v) for v in box)
    rows = slice(pixel_edge(top, height), pixel_edge(top + box_h, height))
    cols = slice(pixel_edge(left, width), pixel_edge(left + box_w, width))
    out = image.copy()
    out[rows, cols] = np.asarray(color, dtype=np.uint8)
    return out


def jitter(image: np.ndarray, rng: np.random.Generator, augment: AugmentConfig) -> np.ndarray:
    """Brightness and contrast, then hue and saturation (each rounded to uint8, as DALI's two operators)."""
    brightness, contrast = uniform(rng.random(), augment.brightness), uniform(rng.random(), augment.contrast)
    hue, saturation = uniform(rng.random(), augment.hue), uniform(rng.random(), augment.saturation)
    pixels = image.astype(np.float32)
    image = _to_uint8(brightness * (CONTRAST_CENTER + contrast * (pixels - CONTRAST_CENTER)))
    matrix = hsv_matrix(hue, saturation).astype(np.float32)
    return _to_uint8(image.astype(np.float32) @ matrix.T)


def grayscale(image: np.ndarray) -> np.ndarray:
    luma = _to_uint8(image.astype(np.float32) @ np.asarray(GRAY_WEIGHTS, dtype=np.float32))
    return np.repeat(luma[..., None], 3, axis=2)


def blur_matrix(size: int, sigma: float) -> np.ndarray:
    """size x size matrix B with B @ column = the column blurred (Gaussian taps, mirrored borders: reflect-101)."""
    radius = blur_window(sigma) // 2
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    taps /= taps.sum()
    period = max(1, 2 * (size - 1))
    source = (np.arange(size)[:, None] + offsets[None, :]) % period  # mirror about the first and last pixel
    source = np.where(source >= size, period - source, source)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (np.repeat(np.arange(size), len(offsets)), source.reshape(-1)), np.tile(taps, size))
    return matrix


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, augment: AugmentConfig) -> np.ndarray:
    """Separable Gaussian blur as two matrix products (cheaper than a convolution call on small crops)."""
    sigma = uniform(rng.random(), augment.blur_sigma)
    rows, cols = blur_matrix(image.shape[0], sigma), blur_matrix(image.shape[1], sigma)
    blurred = np.tensordot(rows, image.astype(np.float32), axes=(1, 0))  # H x W x 3, along the height
    blurred = np.tensordot(blurred, cols.astype(np.float32), axes=(1, 1))  # H x 3 x W, along the width
    return _to_uint8(blurred.transpose(0, 2, 1))


def jpeg(image: np.ndarray, rng: np.random.Generator, augment: AugmentConfig) -> np.ndarray:
    from PIL import Image

    quality = int(rng.integers(augment.jpeg_quality[0], augment.jpeg_quality[1] + 1))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return np.array(decoded.convert("RGB"), dtype=np.uint8)


def augment_image(image: np.ndarray, augment: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """`image` (H x W x 3 uint8) through every data.augment operator whose coin lands, in AUGMENT_OPERATORS order."""
    if augment.crop_prob > 0 and rng.random() < augment.crop_prob:
        image = random_resized_crop(image, rng, augment)
    if augment.downscale_prob > 0 and rng.random() < augment.downscale_prob:
        image = downscale(image, rng, augment)
    if augment.erase_prob > 0 and rng.random() < augment.erase_prob:
        image = fill_box(image, erase_box(*rng.random(4), augment), augment.erase_fill)
    if augment.mask_prob > 0 and rng.random() < augment.mask_prob:
        image = fill_box(image, mask_box(*rng.random(2), augment), augment.mask_fill)
    if augment.jitter_prob > 0 and rng.random() < augment.jitter_prob:
        image = jitter(image, rng, augment)
    if augment.grayscale_prob > 0 and rng.random() < augment.grayscale_prob:
        image = grayscale(image)
    if augment.blur_prob > 0 and rng.random() < augment.blur_prob:
        image = gaussian_blur(image, rng, augment)
    if augment.jpeg_prob > 0 and rng.random() < augment.jpeg_prob:
        image = jpeg(image, rng, augment)
    return image
