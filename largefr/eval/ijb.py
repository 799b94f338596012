"""IJB-B / IJB-C 1:1 template verification, following insightface's `ijb_11.py` protocol.

Layout of `root` (the IJBB or IJBC folder as distributed with insightface's evaluation pack)::

    meta/<target>_face_tid_mid.txt         image name, template id, media id      (one line per image)
    meta/<target>_name_5pts_score.txt      image name, 5 x (x, y) landmarks, detector score (same order)
    meta/<target>_template_pair_label.txt  template id 1, template id 2, label 1/0 (one line per pair)
    loose_crop/<image name>

with `<target>` = `ijbb` or `ijbc`. Protocol: every crop is aligned by its landmarks to the model's input size
(112 x 112 for insightface's models; the ArcFace template scaled for others)
(`largefr.eval.align`), embedded with the flip test (embedding of the image plus that of its mirror
image), multiplied by its detector score (insightface's "D1" mode; the embedding norm is kept,
"N1"); images of one media (the frames of one video, or one still) are averaged, the media
features of a template are summed and the sum is L2-normalized; a pair's score is the cosine of
its two templates. TAR at FAR 1e-6 .. 1e-1 comes from the ROC of all pair scores
(`largefr.eval.roc`).
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from largefr.errors import UserError
from largefr.eval.align import AlignmentError, align_face
from largefr.eval.image_size import DEFAULT_IMAGE_SIZE as ARCFACE_SIZE, image_size_of
from largefr.eval.roc import IJB_FAR_TARGETS, roc_auc, roc_curve, tar_at_far
from largefr.eval.verification import embed_images

IJB_TARGETS = ("IJBB", "IJBC")


class IJBError(UserError, ValueError):
    """IJB meta files or crops that are missing or malformed."""


@dataclass(kw_only=True)
class IJBMeta:
    root: str
    target: str
    image_names: list[str]
    landmarks: np.ndarray
    """N x 5 x 2 float64, pixels of the loose crop."""
    detector_scores: np.ndarray
    template_ids: np.ndarray
    media_ids: np.ndarray
    pair_templates: np.ndarray
    """P x 2 template ids."""
    pair_labels: np.ndarray
    """P bools: same identity."""


def meta_path(root: str, target: str, kind: str) -> str:
    return os.path.join(root, "meta", f"{target.lower()}_{kind}.txt")


def find_ijb_root(root: str, target: str) -> str:
    """`root` if it holds meta/, else `root/<target>` if that does (a folder holding IJBB/ and IJBC/)."""
    if target not in IJB_TARGETS:
        raise IJBError(f"--target must be one of {IJB_TARGETS}, got {target!r}")
    for candidate in (root, os.path.join(root, target)):
        if os.path.isfile(meta_path(candidate, target, "face_tid_mid")):
            return candidate
    raise IJBError(f"{meta_path(root, target, 'face_tid_mid')} not found (nor under {os.path.join(root, target)}): "
                   "--ijb-root must be the folder holding meta/ and loose_crop/")


def _read_rows(path: str, columns: int, parse) -> list[tuple]:
    """Whitespace-separated rows of exactly `columns` fields; `parse(fields)` converts one row."""
    if not os.path.isfile(path):
        raise IJBError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise IJBError(f"{path}:{number}: expected {columns} fields, found {len(fields)}: {line.strip()!r}")
            try:
                rows.append(parse(fields))
            except ValueError as error:
                raise IJBError(f"{path}:{number}: {error}: {line.strip()!r}") from None
    if not rows:
        raise IJBError(f"{path}: empty")
    return rows


def read_ijb_meta(root: str, target: str, *, with_pairs: bool = True) -> IJBMeta:
    """Read and cross-check the three meta files of `target` under `root` (the pair file only `with_pairs`)."""
    root = find_ijb_root(root, target)
    tid_path, lmk_path = meta_path(root, target, "face_tid_mid"), meta_path(root, target, "name_5pts_score")
    media = _read_rows(tid_path, 3, lambda f: (f[0], int(f[1]), int(f[2])))
    points = _read_rows(lmk_path, 12, lambda f: (f[0], [float(v) for v in f[1:11]], float(f[11])))
    pairs = (_read_rows(meta_path(root, target, "template_pair_label"), 3, lambda f: (int(f[0]), int(f[1]), int(f[2])))
             if with_pairs else [])
    if len(media) != len(points):
        raise IJBError(f"{tid_path} lists {len(media)} images but {lmk_path} {len(points)}; they must list the same "
                       "images in the same order")
    for number, ((name, _, _), (other, _, _)) in enumerate(zip(media, points), start=1):
        if name != other:
            raise IJBError(f"image {number}: {tid_path} names {name!r} but {lmk_path} names {other!r}")
    meta = IJBMeta(root=root, target=target, image_names=[m[0] for m in media],
                   landmarks=np.array([p[1] for p in points], dtype=np.float64).reshape(-1, 5, 2),
                   detector_scores=np.array([p[2] for p in points], dtype=np.float64),
                   template_ids=np.array([m[1] for m in media], dtype=np.int64),
                   media_ids=np.array([m[2] for m in media], dtype=np.int64),
                   pair_templates=np.array([p[:2] for p in pairs], dtype=np.int64).reshape(-1, 2),
                   pair_labels=np.array([p[2] for p in pairs], dtype=np.int64) == 1)
    _check_pairs(meta)
    return meta


def _check_pairs(meta: IJBMeta) -> None:
    known = np.isin(meta.pair_templates, meta.template_ids)
    if not known.all():
        row = int(np.nonzero(~known.all(axis=1))[0][0])
        raise IJBError(f"{meta_path(meta.root, meta.target, 'template_pair_label')}:{row + 1}: template "
                       f"{meta.pair_templates[row].tolist()} has no image in the face_tid_mid file")


def load_aligned_face(path: str, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Read one loose crop (RGB) and align it by its landmarks."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise IJBError(f"{path}: crop listed in the meta files is missing") from None
    except OSError as error:
        raise IJBError(f"{path}: unreadable image ({error})") from None
    try:
        return align_face(pixels, landmarks, image_size)
    except AlignmentError as error:
        raise IJBError(f"{path}: {error}") from None


def embed_ijb_images(model: nn.Module, meta: IJBMeta, *, batch_size: int, device: torch.device | str = "cpu",
                     flip: bool = True, workers: int = 4, image_size: int = 112) -> np.ndarray:
    """N x d float32 raw embeddings (flip-sum) of every aligned crop, in meta order."""
    crops = os.path.join(meta.root, "loose_crop")
    chunk = 8 * batch_size  # crops aligned per round, kept as uint8 until embedded
    parts = []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes outside the GIL
        for start in range(0, len(meta.image_names), chunk):
            indices = range(start, min(start + chunk, len(meta.image_names)))
            faces = list(pool.map(lambda i: load_aligned_face(os.path.join(crops, meta.image_names[i]),
                                                              meta.landmarks[i], image_size), indices))
            pixels = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)
            parts.append(embed_images(model, pixels, batch_size=batch_size, flip=flip, device=device).cpu())
    return torch.cat(parts).numpy().astype(np.float32)


def template_features(image_features: np.ndarray, template_ids: np.ndarray, media_ids: np.ndarray,
                      weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids, their L2-normalized features): media mean, then template sum."""
    features = torch.from_numpy(np.asarray(image_features, dtype=np.float64))
    if weights is not None:
        features = features * torch.from_numpy(np.asarray(weights, dtype=np.float64))[:, None]
    media_keys, media_of_image = np.unique(np.stack([template_ids, media_ids], axis=1), axis=0, return_inverse=True)
    media_of_image = torch.from_numpy(media_of_image.reshape(-1))
    media_sum = torch.zeros(len(media_keys), features.shape[1], dtype=torch.float64).index_add_(0, media_of_image,
                                                                                                 features)
    media_mean = media_sum / torch.bincount(media_of_image, minlength=len(media_keys))[:, None]
    templates, template_of_media = np.unique(media_keys[:, 0], return_inverse=True)
    template_sum = torch.zeros(len(templates), features.shape[1], dtype=torch.float64).index_add_(
        0, torch.from_numpy(template_of_media.reshape(-1)), media_mean)
    return templates, torch.nn.functional.normalize(template_sum, dim=1).numpy()


def template_pair_scores(templates: np.ndarray, features: np.ndarray, pair_templates: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair's two template features."""
    rows = np.searchsorted(templates, pair_templates)
    return np.sum(features[rows[:, 0]] * features[rows[:, 1]], axis=1)


@dataclass(kw_only=True)
class IJBResult:
    target: str
    images: int
    templates: int
    pairs: int
    positive_pairs: int
    negative_pairs: int
    tar_at_far: list[dict] = field(default_factory=list)
    """One {far_target, tar, far, threshold} per target FAR."""
    auc: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def score_templates(meta: IJBMeta, image_features: np.ndarray, *, use_detector_score: bool = True,
                    far_targets: tuple[float, ...] = IJB_FAR_TARGETS) -> tuple[IJBResult, np.ndarray]:
    """(result, pair scores) from per-image embeddings in meta order."""
    weights = meta.detector_scores if use_detector_score else None
    templates, features = template_features(image_features, meta.template_ids, meta.media_ids, weights)
    scores = template_pair_scores(templates, features, meta.pair_templates)
    fpr, tpr, _ = roc_curve(scores, meta.pair_labels)
    result = IJBResult(target=meta.target, images=len(meta.image_names), templates=len(templates),
                       pairs=int(scores.size), positive_pairs=int(meta.pair_labels.sum()),
                       negative_pairs=int((~meta.pair_labels).sum()),
                       tar_at_far=[asdict(t) for t in tar_at_far(scores, meta.pair_labels, far_targets)],
                       auc=roc_auc(fpr, tpr))
    return result, scores


def evaluate_ijb(model: nn.Module, root: str, target: str, *, batch_size: int, device: torch.device | str = "cpu",
                 workers: int = 4, flip: bool = True,
                 use_detector_score: bool = True) -> tuple[IJBResult, np.ndarray, np.ndarray]:
    """(result, pair scores, pair labels) of the whole protocol on the IJB folder `root`.

    The crops are aligned at the model's input size (the 112 px ArcFace template scaled), said in one line
    when it is not 112.
    """
    started = time.perf_counter()
    meta = read_ijb_meta(root, target)
    image_size = image_size_of(model)
    if image_size != ARCFACE_SIZE:
        print(f"{target}: loose crops aligned at the model's input size {image_size}x{image_size} (the ArcFace "
              f"{ARCFACE_SIZE}x{ARCFACE_SIZE} template scaled)", file=sys.stderr, flush=True)
    image_features = embed_ijb_images(model, meta, batch_size=batch_size, device=device, flip=flip, workers=workers,
                                      image_size=image_size)
    result, scores = score_templates(meta, image_features, use_detector_score=use_detector_score)
    result.seconds = time.perf_counter() - started
    return result, scores, meta.pair_labels


def format_ijb_table(result: IJBResult) -> str:
    header = " ".join(f"{t['far_target']:>8.0e}" for t in result.tar_at_far)
    tars = " ".join(f"{100 * t['tar']:>8.2f}" for t in result.tar_at_far)
    fars = " ".join(f"{t['far']:>8.1e}" for t in result.tar_at_far)
    return "\n".join([
        f"{result.target}: {result.images} images, {result.templates} templates, {result.pairs} pairs "
        f"({result.positive_pairs} genuine, {result.negative_pairs} impostor), AUC {100 * result.auc:.2f}%",
        f"{'FAR':<12}{header}", f"{'TAR (%)':<12}{tars}", f"{'FAR reached':<12}{fars}"])
