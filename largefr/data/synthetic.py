"""Synthetic face-like identity data sets in insightface's layout, deterministic given the seed.

`generate_dataset` writes, into one folder:
- `train.rec`, `train.idx`, `property`: `identities` x `images_per_identity` JPEGs (sorted by
  identity, as insightface's own files are), labels 0 .. identities-1;
- `synth_val.bin`: `pairs` verification pairs (insightface .bin), even pairs same-identity, odd
  pairs different, all drawn from held-out identities that are not in the training set;
- `synth_heldout/<identity>/<n>.jpg`: `heldout_identities` x `heldout_images_per_identity` JPEGs of
  further identities, in neither the training set nor the pairs, one sub-folder per identity (the
  layout `largefr.eval.embed.embed_folder` and tools/pack_rec.py read): labelled images for the
  clustering evaluation (the paper's Table 5); absent when either count is 0;
- `synth_meta.json`: the generation parameters and which identity ids each pair uses.

Every image is rendered from its own seed stream, so the bytes do not depend on `workers`.
The folder is built under a temporary name and renamed at the end: a folder with the final
name is always complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from largefr.data.recordio import write_insightface_rec
from largefr.data.synthetic_faces import FaceIdentity, render_identity_image, sample_identity
from largefr.errors import UsageError

__all__ = ["FaceIdentity", "sample_identity", "render_identity_image", "generate_dataset",
           "ensure_dataset", "validate_arguments", "read_meta", "META_FILE", "VAL_FILE", "HELDOUT_DIR"]

META_FILE = "synth_meta.json"
VAL_FILE = "synth_val.bin"
HELDOUT_DIR = "synth_heldout"
JPEG_QUALITY = 90
FORMAT_VERSION = 2  # bump whenever the renderer's output changes: cached data sets then count as stale
# Seed-stream tags: each kind of randomness has its own stream, so that e.g. changing the
# number of training identities leaves the validation identities unchanged.
# New kinds get new tags at the end: the held-out folder (tags 5, 6) left the training and val bytes as they were.
_TRAIN_IDENTITY, _TRAIN_IMAGES, _VAL_IDENTITY, _VAL_PAIRS, _VAL_IMAGES, _HELDOUT_IDENTITY, _HELDOUT_IMAGES = range(7)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def default_val_identities(pairs: int) -> int:
    """Held-out identities for `pairs` pairs: about four pairs per identity, at least two."""
    return max(2, pairs // 4)


def validate_arguments(*, identities: int, images_per_identity: int, pairs: int, image_size: int,
                       seed: int, workers: int, val_identities: int | None = None,
                       heldout_identities: int = 0, heldout_images_per_identity: int = 0) -> None:
    """Raise ValueError listing every bad argument at once."""
    problems = []
    if identities < 2:
        problems.append(f"identities must be >= 2 (got {identities})")
    if images_per_identity < 1:
        problems.append(f"images per identity must be >= 1 (got {images_per_identity})")
    if pairs < 2 or pairs % 2:
        problems.append(f"pairs must be an even number >= 2, half same-identity (got {pairs})")
    if not 32 <= image_size <= 1024:
        problems.append(f"image size must be in [32, 1024] (got {image_size})")
    if seed < 0:
        problems.append(f"seed must be >= 0 (got {seed})")
    if workers < 1:
        problems.append(f"workers must be >= 1 (got {workers})")
    if val_identities is not None and val_identities < 2:
        problems.append(f"val identities must be >= 2 (got {val_identities})")
    if heldout_identities < 0 or heldout_identities == 1:
        problems.append(f"held-out identities must be 0 (none) or >= 2, to be clustered (got {heldout_identities})")
    if heldout_images_per_identity < 0:
        problems.append(f"held-out images per identity must be >= 0 (got {heldout_images_per_identity})")
    if problems:
        raise UsageError("bad synthetic data set arguments: " + "; ".join(problems))


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _render_train_identity(task: tuple[int, int, int, int]) -> list[bytes]:
    """All JPEGs of one training identity (runs in a worker process)."""
    seed, label, count, image_size = task
    identity = sample_identity(_rng(seed, _TRAIN_IDENTITY, label))
    images = _rng(seed, _TRAIN_IMAGES, label)
    return [encode_jpeg(render_identity_image(identity, images, image_size), JPEG_QUALITY)
            for _ in range(count)]


def _render_val_pair(task: tuple[int, int, int, int, int]) -> tuple[bytes, bytes]:
    """The two JPEGs of one verification pair of held-out identities (a == b: same identity)."""
    seed, index, first, second, image_size = task
    images = _rng(seed, _VAL_IMAGES, index)
    return tuple(encode_jpeg(render_identity_image(sample_identity(_rng(seed, _VAL_IDENTITY, v)),
                                                   images, image_size), JPEG_QUALITY)
                 for v in (first, second))


def _render_heldout_identity(task: tuple[int, int, int, int]) -> list[bytes]:
    """All JPEGs of one labelled held-out identity (runs in a worker process)."""
    seed, index, count, image_size = task
    identity = sample_identity(_rng(seed, _HELDOUT_IDENTITY, index))
    images = _rng(seed, _HELDOUT_IMAGES, index)
    return [encode_jpeg(render_identity_image(identity, images, image_size), JPEG_QUALITY)
            for _ in range(count)]


def heldout_folder_names(identities: int, images_per_identity: int) -> tuple[list[str], list[str]]:
    """(identity sub-folder names, image file names): zero-padded, so sorted order is numeric order."""
    return ([f"id{index:05d}" for index in range(identities)],
            [f"{image:04d}.jpg" for image in range(images_per_identity)])


def _write_heldout(folder: Path, seed: int, identities: int, images_per_identity: int, image_size: int,
                   workers: int, show_progress: bool) -> None:
    progress = _Progress(show_progress, "held-out", identities * images_per_identity)
    tasks = [(seed, index, images_per_identity, image_size) for index in range(identities)]
    identity_names, image_names = heldout_folder_names(identities, images_per_identity)
    for identity_name, images in zip(identity_names, _map(_render_heldout_identity, tasks, workers)):
        identity_dir = folder / HELDOUT_DIR / identity_name
        identity_dir.mkdir(parents=True)
        for image_name, image in zip(image_names, images):
            (identity_dir / image_name).write_bytes(image)
        progress.advance(len(images))


def _pair_plan(seed: int, pairs: int, val_identities: int) -> list[tuple[int, int]]:
    """Held-out identity indices of every pair: even pairs the same identity, odd pairs two different."""
    rng = _rng(seed, _VAL_PAIRS)
    plan = []
    for index in range(pairs):
        first = int(rng.integers(val_identities))
        second = first if index % 2 == 0 else int((first + rng.integers(1, val_identities)) % val_identities)
        plan.append((first, second))
    return plan


def _map(function: Any, tasks: list, workers: int) -> Iterator:
    """Ordered map, in this process or in a spawn pool (fork is unsafe once torch threads exist).

    Spawned workers re-import the main script: from a heavy one (the trainer) workers=1 is cheaper.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(function, tasks, chunksize=1)


class _Progress:
    """Rate-limited progress lines on stderr."""

    def __init__(self, enabled: bool, what: str, total: int) -> None:
        self.enabled, self.what, self.total = enabled, what, total
        self.start = self.last = time.perf_counter()
        self.done = 0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and (now - self.last >= 2.0 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"synthetic: {self.what} {self.done}/{self.total} images ({rate:.0f} img/s)",
                  file=sys.stderr, flush=True)


def _train_samples(seed: int, identities: int, images_per_identity: int, image_size: int,
                   workers: int, progress: _Progress) -> Iterable[tuple[int, bytes]]:
    tasks = [(seed, label, images_per_identity, image_size) for label in range(identities)]
    for label, images in enumerate(_map(_render_train_identity, tasks, workers)):
        progress.advance(len(images))
        for image in images:
            yield label, image


def _write_val(folder: Path, seed: int, plan: list[tuple[int, int]], image_size: int,
               workers: int, show_progress: bool) -> None:
    # Imported here: verification_bin imports torch, which spawned render workers must not pay for.
    from largefr.data.verification_bin import write_bin

    progress = _Progress(show_progress, "val", 2 * len(plan))
    tasks = [(seed, index, a, b, image_size) for index, (a, b) in enumerate(plan)]
    images: list[bytes] = []
    for pair in _map(_render_val_pair, tasks, workers):
        images.extend(pair)
        progress.advance(2)
    write_bin(str(folder / VAL_FILE), images, [a == b for a, b in plan])


def _meta(*, identities: int, images_per_identity: int, pairs: int, image_size: int, seed: int,
          val_identities: int, plan: list[tuple[int, int]], heldout_identities: int,
          heldout_images_per_identity: int) -> dict[str, Any]:
    """What synth_meta.json records: the parameters; val ids follow the training ids, held-out folder ids follow those."""
    heldout_start = identities + val_identities
    heldout = heldout_identities if heldout_images_per_identity > 0 else 0
    return {
        "format_version": FORMAT_VERSION, "identities": identities,
        "images_per_identity": images_per_identity, "pairs": pairs, "image_size": image_size,
        "seed": seed, "val_identities": val_identities, "jpeg_quality": JPEG_QUALITY,
        "num_classes": identities, "num_images": identities * images_per_identity,
        "train_identity_ids": [0, identities],  # half-open range
        "val_identity_ids": list(range(identities, identities + val_identities)),
        "pair_identity_ids": [[identities + a, identities + b] for a, b in plan],
        "heldout_identities": heldout_identities, "heldout_images_per_identity": heldout_images_per_identity,
        "heldout_dir": HELDOUT_DIR if heldout else None,
        "heldout_identity_ids": list(range(heldout_start, heldout_start + heldout)),
        "files": ["train.rec", "train.idx", "property", VAL_FILE, META_FILE] + ([HELDOUT_DIR] if heldout else []),
    }


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished staging folder to `out` (replacing an old one only when `overwrite`)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} was filled by another process while this one generated; this "
                                  "generation is discarded (generate on one process only, e.g. rank 0)")
        retired = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)  # an empty directory is replaced atomically too


def generate_dataset(out_dir: str | os.PathLike, *, identities: int, images_per_identity: int,
                     pairs: int, image_size: int = 112, seed: int = 0, workers: int = 1,
                     progress: bool = True, val_identities: int | None = None, heldout_identities: int = 0,
                     heldout_images_per_identity: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write a synthetic data set into `out_dir` (see the module docstring); return its summary.

    The labelled held-out folder is opt-in here (0 identities); the config's data.synthetic asks for it.
    """
    validate_arguments(identities=identities, images_per_identity=images_per_identity, pairs=pairs,
                       image_size=image_size, seed=seed, workers=workers, val_identities=val_identities,
                       heldout_identities=heldout_identities,
                       heldout_images_per_identity=heldout_images_per_identity)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out} exists and is not an empty folder: choose another output folder "
                              "or pass overwrite=True (--overwrite) to replace it")
    val_identities = val_identities or default_val_identities(pairs)
    plan = _pair_plan(seed, pairs, val_identities)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        train_progress = _Progress(progress, "train", identities * images_per_identity)
        samples = _train_samples(seed, identities, images_per_identity, image_size, workers, train_progress)
        written = write_insightface_rec(str(staging), samples, num_classes=identities,
                                        image_size=(image_size, image_size))
        _write_val(staging, seed, plan, image_size, workers, progress)
        heldout_images = heldout_identities * heldout_images_per_identity
        if heldout_images:
            _write_heldout(staging, seed, heldout_identities, heldout_images_per_identity, image_size, workers,
                           progress)
        meta = _meta(identities=identities, images_per_identity=images_per_identity, pairs=pairs,
                     image_size=image_size, seed=seed, val_identities=val_identities, plan=plan,
                     heldout_identities=heldout_identities, heldout_images_per_identity=heldout_images_per_identity)
        (staging / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    total_images = written + 2 * pairs + heldout_images
    return {"out_dir": str(out), "num_classes": identities, "num_images": written, "pairs": pairs,
            "val_identities": val_identities, "heldout_identities": heldout_identities if heldout_images else 0,
            "heldout_images": heldout_images, "image_size": image_size, "seed": seed,
            "seconds": seconds, "images_per_sec": total_images / max(seconds, 1e-9)}


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """The synth_meta.json of a generated folder."""
    path = Path(folder) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {folder} is not a data set written by "
                                "largefr.data.synthetic (or its generation did not finish)") from None


def ensure_dataset(out_dir: str | os.PathLike, *, identities: int, images_per_identity: int, pairs: int,
                   image_size: int = 112, seed: int = 0, heldout_identities: int = 0,
                   heldout_images_per_identity: int = 0, workers: int = 1, progress: bool = True,
                   replace_stale: bool = False) -> dict[str, Any]:
    """Generate into `out_dir` unless it already holds exactly this data set (a cache); return its meta.

    A folder holding another synthetic data set is an error, or is regenerated with
    `replace_stale=True`; a non-empty folder without synth_meta.json is never touched. Call it on
    one process (e.g. rank 0, then a barrier): two concurrent generations into one folder race.
    """
    wanted = {"identities": identities, "images_per_identity": images_per_identity, "pairs": pairs,
              "image_size": image_size, "seed": seed, "heldout_identities": heldout_identities,
              "heldout_images_per_identity": heldout_images_per_identity, "format_version": FORMAT_VERSION}
    out = Path(out_dir)
    if not out.exists() or not any(out.iterdir()):
        generate_dataset(out, **{k: v for k, v in wanted.items() if k != "format_version"},
                         workers=workers, progress=progress)
        return read_meta(out)
    meta = read_meta(out)
    differing = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
    if differing and replace_stale:
        generate_dataset(out, **{k: v for k, v in wanted.items() if k != "format_version"},
                         workers=workers, progress=progress, overwrite=True)
        return read_meta(out)
    if differing:
        details = ", ".join(f"{k}: has {have}, wanted {want}" for k, (have, want) in differing.items())
        raise UsageError(f"{out} holds a different synthetic data set ({details}): delete it or "
                         "point the config at another folder")
    return meta
