"""data.augment: each operator's effect, checked statistically on known images, in both loaders; resume replay."""
from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.config import AugmentConfig, Config, ConfigError
from largefr.data import build_loader
from largefr.data.recordio import write_insightface_rec
from largefr.data.synthetic import generate_dataset

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia") is None
                                or importlib.util.find_spec("nvidia.dali") is None,
                                reason='DALI not installed (pip install "largefr[dali]")')
KINDS = [pytest.param("dali", marks=needs_dali), "torch"]
SIZE, COUNT = 32, 64  # 64 images of 32x32 per data set, read as 4 batches of 16


def _write_rec(folder: str, images: list[np.ndarray]) -> str:
    """A .rec of lossless PNGs (the loaders see exactly these pixels), two classes."""
    def png(pixels: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        return out.getvalue()

    write_insightface_rec(folder, [(i % 2, png(image)) for i, image in enumerate(images)], num_classes=2,
                          image_size=(SIZE, SIZE))
    return folder


@pytest.fixture(scope="module")
def noise_rec(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(COUNT)]
    return _write_rec(str(tmp_path_factory.mktemp("noise")), images)


@pytest.fixture(scope="module")
def flat_rec(tmp_path_factory) -> str:
    """Every pixel (100, 100, 100): a known mean, and no pixel equal to a fill color."""
    return _write_rec(str(tmp_path_factory.mktemp("flat")), [np.full((SIZE, SIZE, 3), 100, np.uint8)] * COUNT)


@pytest.fixture(scope="module")
def ramp_rec(tmp_path_factory) -> str:
    """R = 40 + 4 x, G = 40 + 4 y, B = 128: the red slope along x is 4 per pixel."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([40 + 4 * x, 40 + 4 * y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    return _write_rec(str(tmp_path_factory.mktemp("ramp")), [image] * COUNT)


@pytest.fixture(scope="module")
def smooth_rec(tmp_path_factory) -> str:
    """Smooth random colors (bicubic upsampling of 8x8 noise): every operator has something to change."""
    rng = np.random.default_rng(1)
    images = [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIZE, SIZE),
                                                                                                  Image.BICUBIC))
              for _ in range(COUNT)]
    return _write_rec(str(tmp_path_factory.mktemp("smooth")), images)


def _augmented(kind: str, folder: str, **fields) -> np.ndarray:
    """N x H x W x 3 uint8 of one epoch (file order, no flip) through data.augment `fields`."""
    loader = build_loader(kind, rec=folder, batch_size=16, rank=0, world_size=1, num_classes=2, image_size=SIZE,
                          num_workers=0, shuffle=False, random_flip=False, seed=5, augment=AugmentConfig(**fields),
                          **({"device": "cpu"} if kind == "dali" else {}))
    images = torch.cat([batch for batch, _ in loader])
    return torch.round(images * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _high_frequency_energy(images: np.ndarray) -> float:
    """Mean squared difference of horizontal and vertical neighbours."""
    pixels = images.astype(np.float64)
    return float(np.mean(np.diff(pixels, axis=1) ** 2) + np.mean(np.diff(pixels, axis=2) ** 2))


def _is_gray(images: np.ndarray) -> np.ndarray:
    return (images[..., 0] == images[..., 1]).all(axis=(1, 2)) & (images[..., 1] == images[..., 2]).all(axis=(1, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_grayscale_makes_channels_equal_with_its_probability(noise_rec, kind):
    always = _augmented(kind, noise_rec, grayscale_prob=1.0)
    assert _is_gray(always).all()
    original = _augmented(kind, noise_rec)
    luma = original.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(always[..., 0] - luma).max() <= 1.0  # BT.601 luma, rounded
    half = _is_gray(_augmented(kind, noise_rec, grayscale_prob=0.5)).mean()
    assert 0.25 < half < 0.75  # 64 coins: 4 standard deviations around 0.5
    assert not _is_gray(original).any()


@pytest.mark.parametrize("kind", KINDS)
def test_erasing_covers_the_configured_share(flat_rec, kind):
    exact = (_augmented(kind, flat_rec, erase_prob=1.0, erase_area=[0.25, 0.25], erase_ratio=[1.0, 1.0]) == 0)
    shares = exact.all(axis=-1).mean(axis=(1, 2))
    assert np.all(np.abs(shares - 0.25) <= 0.04)  # a 16x16 square, up to a row and a column of rounding
    ranged = _augmented(kind, flat_rec, erase_prob=1.0, erase_area=[0.1, 0.3], erase_ratio=[0.5, 2.0],
                        erase_fill=[255, 0, 0])
    shares = (ranged == [255, 0, 0]).all(axis=-1).mean(axis=(1, 2))
    assert abs(shares.mean() - 0.2) < 0.03 and shares.std() > 0.03  # uniform in [0.1, 0.3]: mean 0.2, std 0.058
    assert ((ranged == [255, 0, 0]).all(axis=-1) | (ranged == 100).all(axis=-1)).all()  # nothing else changed


@pytest.mark.parametrize("kind", KINDS)
def test_mask_covers_the_lower_face(flat_rec, kind):
    masked = _augmented(kind, flat_rec, mask_prob=1.0, mask_top=[0.5, 0.5], mask_width=[0.75, 0.75],
                        mask_fill=[170, 200, 225])
    covered = (masked == [170, 200, 225]).all(axis=-1)
    assert not covered[:, :SIZE // 2].any()  # the upper half (eyes) is untouched
    assert covered[:, SIZE // 2:, 4:28].all() and not covered[:, :, :3].any() and not covered[:, :, 29:].any()
    varied = _augmented(kind, flat_rec, mask_prob=1.0, mask_top=[0.5, 0.7], mask_width=[0.6, 0.9])
    shares = (varied != 100).any(axis=-1).mean(axis=(1, 2))
    assert abs(shares.mean() - 0.4 * 0.75) < 0.03  # E[1 - top] * E[width]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("factor", ["brightness", "contrast"])
def test_jitter_moves_the_mean_within_the_range(flat_rec, kind, factor):
    jittered = _augmented(kind, flat_rec, jitter_prob=1.0, **{factor: [0.6, 1.4]})
    means = jittered.reshape(COUNT, -1).mean(axis=1)
    drawn = means / 100 if factor == "brightness" else (means - 128) / (100 - 128)  # b * 100, 128 + c * (100 - 128)
    assert drawn.min() > 0.6 - 0.02 and drawn.max() < 1.4 + 0.02
    assert abs(drawn.mean() - 1.0) < 0.1 and drawn.std() > 0.15  # uniform in [0.6, 1.4]: std 0.23
    assert (jittered == jittered[..., :1]).all()  # a gray image stays gray


@pytest.mark.parametrize("kind", KINDS)
def test_saturation_zero_and_hue_keep_the_luma(noise_rec, kind):
    original = _augmented(kind, noise_rec).astype(np.float64)
    desaturated = _augmented(kind, noise_rec, jitter_prob=1.0, saturation=[0.0, 0.0])
    assert np.abs(desaturated.astype(np.float64) - desaturated[..., :1]).max() <= 1.0
    rotated = _augmented(kind, noise_rec, jitter_prob=1.0, hue=[90.0, 90.0]).astype(np.float64)
    luma = np.array([0.299, 0.587, 0.114])
    assert np.abs(rotated - original).mean() > 20  # the colors moved ...
    assert abs((rotated @ luma).mean() - (original @ luma).mean()) < 6  # ... around the gray axis (some clipping)


@pytest.mark.parametrize("kind", KINDS)
def test_crop_changes_content_and_keeps_the_size(ramp_rec, kind):
    original = _augmented(kind, ramp_rec)
    cropped = _augmented(kind, ramp_rec, crop_prob=1.0, crop_scale=[0.25, 0.25], crop_ratio=[1.0, 1.0])
    assert cropped.shape == original.shape == (COUNT, SIZE, SIZE, 3)
    slope = np.diff(cropped[:, 4:-4, 4:-4, 0].astype(np.float64), axis=2).mean(axis=(1, 2))
    assert np.all(np.abs(slope / 4.0 - 0.5) < 0.06)  # a 16x16 box shown at 32x32: half the slope
    corners = cropped[:, 0, 0, 0].astype(int)
    assert len(np.unique(corners)) > 5 and corners.min() >= 40 and corners.max() <= 40 + 4 * 16 + 2  # boxes vary
    kept = _augmented(kind, ramp_rec, crop_prob=1.0, crop_scale=[0.8, 1.0])
    assert np.abs(kept.astype(int) - original).mean() > 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_blur_and_downscale_lower_high_frequency_energy(noise_rec, kind):
    sharp = _high_frequency_energy(_augmented(kind, noise_rec))
    light = _high_frequency_energy(_augmented(kind, noise_rec, blur_prob=1.0, blur_sigma=[0.8, 0.8]))
    heavy = _high_frequency_energy(_augmented(kind, noise_rec, blur_prob=1.0, blur_sigma=[2.0, 2.0]))
    assert heavy < light < 0.35 * sharp
    low_res = _augmented(kind, noise_rec, downscale_prob=1.0, downscale_range=[0.5, 0.5])
    assert low_res.shape == (COUNT, SIZE, SIZE, 3) and _high_frequency_energy(low_res) < 0.35 * sharp


@pytest.mark.parametrize("kind", KINDS)
def test_jpeg_changes_pixels_within_the_quality_bounds(noise_rec, kind):
    original = _augmented(kind, noise_rec).astype(np.float64)

    def error(quality: list[int]) -> float:
        return float(np.abs(_augmented(kind, noise_rec, jpeg_prob=1.0, jpeg_quality=quality) - original).mean())

    def pil_error(quality: int) -> float:  # the same round trip through PIL's codec, as a yardstick
        out = []
        for image in original.astype(np.uint8)[:8]:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
            out.append(np.abs(np.asarray(Image.open(buffer)).astype(np.float64) - image).mean())
        return float(np.mean(out))

    low, high, ranged = error([10, 10]), error([95, 95]), error([10, 95])
    assert 0 < high < ranged < low
    for quality, measured in ((10, low), (95, high)):
        assert 0.6 < measured / pil_error(quality) < 1.6


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_replays_the_augmentations(tmp_path, kind):
    folder = str(tmp_path / "synthetic")
    generate_dataset(folder, identities=4, images_per_identity=12, pairs=2, image_size=SIZE, progress=False)
    augment = AugmentConfig(crop_prob=0.5, downscale_prob=0.3, erase_prob=0.5, mask_prob=0.3, jitter_prob=0.5,
                            brightness=[0.7, 1.3], hue=[-20.0, 20.0], grayscale_prob=0.3, blur_prob=0.3,
                            jpeg_prob=0.3)

    def epoch(loader, number: int, skip: int = 0) -> list[torch.Tensor]:
        loader.set_epoch(number)
        return [images.clone() for images, _ in loader.iter_from(skip)]

    def make(augment_config):
        return build_loader(kind, rec=folder, batch_size=8, rank=1, world_size=2, num_classes=4, image_size=SIZE,
                            num_workers=1, shuffle=True, random_flip=True, seed=7, augment=augment_config,
                            **({"device": "cpu"} if kind == "dali" else {}))

    uninterrupted = make(augment)
    full, next_epoch = epoch(uninterrupted, 1), epoch(uninterrupted, 2)
    resumed = epoch(make(augment), 1, skip=1)  # a new process resuming at batch 1 of epoch 1
    assert len(full) == 3 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[1:]))
    plain = epoch(make(None), 1)
    assert not any(torch.equal(a, b) for a, b in zip(plain, full))  # augmentation changed every batch
    assert not any(torch.equal(a, b) for a, b in zip(full, next_epoch))


SAME_IN_BOTH = {  # operators with fixed parameters: one formula, so both loaders agree to rounding
    "grayscale": dict(grayscale_prob=1.0),
    "brightness_contrast": dict(jitter_prob=1.0, brightness=[1.2, 1.2], contrast=[0.7, 0.7]),
    "hue_saturation": dict(jitter_prob=1.0, hue=[30.0, 30.0], saturation=[1.3, 1.3]),
    "blur": dict(blur_prob=1.0, blur_sigma=[1.0, 1.0]),
    "mask": dict(mask_prob=1.0, mask_top=[0.61, 0.61], mask_width=[0.55, 0.55]),
    "jpeg": dict(jpeg_prob=1.0, jpeg_quality=[50, 50]),
}


@needs_dali
def test_both_loaders_apply_the_same_operator(smooth_rec):
    for name, fields in SAME_IN_BOTH.items():
        dali, fallback = (_augmented(kind, smooth_rec, **fields).astype(int) for kind in ("dali", "torch"))
        assert np.abs(dali - fallback).max() <= 1, name
        assert np.abs(dali - _augmented("torch", smooth_rec)).mean() > 0.5, name  # and it did change the images
    fields = dict(downscale_prob=1.0, downscale_range=[0.5, 0.5])  # two resamplers: close, not equal
    dali, fallback = (_augmented(kind, smooth_rec, **fields).astype(int) for kind in ("dali", "torch"))
    assert np.abs(dali - fallback).mean() < 0.5


def test_augment_fields_are_checked_all_at_once():
    with pytest.raises(ConfigError, match=r"(?s)data\.augment\.blur_prob: must be a probability.*"
                                          r"data\.augment\.jpeg_quality: must satisfy 1.*"
                                          r"data\.augment\.mask_fill: must be \[R, G, B\]"):
        Config.from_dict({"data": {"loader": "synthetic", "num_classes": 2, "num_images": 256,
                                   "augment": {"blur_prob": 1.5, "jpeg_quality": [0, 90], "mask_fill": [1, 2]}},
                          "output": "x"})
    with pytest.raises(ConfigError, match=r"data\.augment\.crop_scale: must satisfy 0\.0 < low"):
        AugmentConfig(crop_scale=[0.0, 1.0])
    with pytest.raises(ConfigError, match=r"data\.augment\.jitter_prob: the jitter would change nothing"):
        AugmentConfig(jitter_prob=0.5)
    assert not AugmentConfig().enabled and AugmentConfig(jpeg_prob=0.1).enabled


def _resume_with_augmentation(rank: int, world: int, data: str, output: str, kind: str) -> dict:
    from tests.test_trainer import _train, tiny_config

    augment = {"crop_prob": 0.5, "erase_prob": 0.3, "mask_prob": 0.3, "jitter_prob": 0.5, "brightness": [0.7, 1.3],
               "grayscale_prob": 0.3, "blur_prob": 0.3, "jpeg_prob": 0.3}
    sections = dict(data={"loader": kind, "augment": augment}, train={"zero_stage": 2})
    straight = _train(rank, world, tiny_config(data, f"{output}/straight", **sections))
    config = tiny_config(data, f"{output}/stopped", **sections)
    stopped = _train(rank, world, config, sigterm_after=2)
    resumed = _train(rank, world, config, resume="auto")
    plain = _train(rank, world, tiny_config(data, f"{output}/plain", data={"loader": kind}, train={"zero_stage": 2}))
    return {"straight": straight["losses"], "stopped": stopped["losses"], "resumed": resumed["losses"],
            "plain": plain["losses"]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_trainer_resumed_with_augmentation_reproduces_the_losses(tmp_path, kind):
    from tests.distributed_helpers import run_distributed

    data = str(tmp_path / "data")
    generate_dataset(data, identities=16, images_per_identity=8, pairs=20, image_size=SIZE, seed=1, progress=False)
    for result in run_distributed(_resume_with_augmentation, 2, data, str(tmp_path), kind):
        torch.testing.assert_close(torch.tensor(result["stopped"] + result["resumed"]),
                                   torch.tensor(result["straight"]), rtol=0, atol=1e-6)
        assert result["plain"] != pytest.approx(result["straight"], abs=1e-3)  # augmentation changed the batches
