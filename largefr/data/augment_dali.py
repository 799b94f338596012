"""data.augment in the DALI pipeline: the operators of largefr/data/augment.py with DALI's own operators.

Called inside the pipeline definition (built with DALI conditionals), on decoded H x W x 3 uint8
images on the CPU (device_id=None) or the GPU ("mixed" decode): the same graph either way, the
random draws and coins always on the CPU as DALI requires. Each operator runs in an `if coin:` branch,
so only the images whose coin landed pay for it.
"""
from __future__ import annotations

from largefr.data.augment import CONTRAST_CENTER, CROP_ATTEMPTS, AugmentConfig, erase_box, mask_box, uniform


def _dali():
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    return fn, dmath, types


def _coin(probability: float):
    fn, _, types = _dali()
    return fn.random.coin_flip(probability=probability, dtype=types.BOOL)


def _u():
    """One uniform in [0, 1) per sample."""
    fn, _, _ = _dali()
    return fn.random.uniform(range=(0.0, 1.0))


def _is_identity(bounds: list[float], neutral: float) -> bool:
    return bounds[0] == bounds[1] == neutral


def _fill_box(images, box, color: list[int]):
    fn, _, _ = _dali()
    top, left, height, width = box
    return fn.erase(images, anchor=fn.stack(top, left), shape=fn.stack(height, width), axis_names="HW",
                    normalized_anchor=True, normalized_shape=True, fill_value=[float(c) for c in color])


def _geometry(images, augment: AugmentConfig, image_size: int):
    fn, _, types = _dali()
    if augment.crop_prob > 0:
        if _coin(augment.crop_prob):
            images = fn.random_resized_crop(images, size=(image_size, image_size), random_area=augment.crop_scale,
                                            random_aspect_ratio=augment.crop_ratio, num_attempts=CROP_ATTEMPTS,
                                            interp_type=types.INTERP_LINEAR, antialias=True)
    if augment.downscale_prob > 0:
        if _coin(augment.downscale_prob):
            side = uniform(_u(), augment.downscale_range) * image_size
            images = fn.resize(images, resize_x=side, resize_y=side, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.resize(images, size=(image_size, image_size), interp_type=types.INTERP_LINEAR,
                               antialias=True)
    return images


def _occlusion(images, augment: AugmentConfig):
    _, dmath, _ = _dali()
    if augment.erase_prob > 0:
        if _coin(augment.erase_prob):
            images = _fill_box(images, erase_box(_u(), _u(), _u(), _u(), augment, dmath), augment.erase_fill)
    if augment.mask_prob > 0:
        if _coin(augment.mask_prob):
            images = _fill_box(images, mask_box(_u(), _u(), augment), augment.mask_fill)
    return images


def _photometric(images, augment: AugmentConfig):
    fn, _, types = _dali()
    if augment.jitter_prob > 0:
        if _coin(augment.jitter_prob):
            if not (_is_identity(augment.brightness, 1.0) and _is_identity(augment.contrast, 1.0)):
                images = fn.brightness_contrast(images, brightness=uniform(_u(), augment.brightness),
                                                contrast=uniform(_u(), augment.contrast),
                                                contrast_center=CONTRAST_CENTER)
            if not (_is_identity(augment.hue, 0.0) and _is_identity(augment.saturation, 1.0)):
                images = fn.hsv(images, hue=uniform(_u(), augment.hue),
                                saturation=uniform(_u(), augment.saturation))
    if augment.grayscale_prob > 0:
        if _coin(augment.grayscale_prob):
            luma = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
            images = fn.cat(luma, luma, luma, axis=2)
    if augment.blur_prob > 0:
        if _coin(augment.blur_prob):
            images = fn.gaussian_blur(images, sigma=uniform(_u(), augment.blur_sigma))
    if augment.jpeg_prob > 0:
        if _coin(augment.jpeg_prob):
            low, high = augment.jpeg_quality
            quality = fn.random.uniform(values=list(range(low, high + 1)), dtype=types.INT32)
            images = fn.jpeg_compression_distortion(images, quality=quality)
    return images


def augment_images(images, augment: AugmentConfig, image_size: int):
    """Decoded images through every data.augment operator (AUGMENT_OPERATORS order), each behind its coin."""
    images = _geometry(images, augment, image_size)
    images = _occlusion(images, augment)
    return _photometric(images, augment)
