"""Evaluation on the user's own labelled faces: a seeded balanced pair list and a probe/gallery split.

From `LabelledImages` (`largefr.eval.labelled_images`) and one seed:

- *Pairs* (`make_pairs`): `num_pairs // 2` positive pairs drawn uniformly without replacement from
  every same-identity pair, as many negative pairs drawn uniformly from the different-identity
  pairs, shuffled together (the 10 folds of the accuracy must each hold both kinds). Written as
  `name_a <TAB> name_b <TAB> 1|0` lines (`write_pairs`) so the list can be reused (`read_pairs`).
  Measures: insightface's 10-fold accuracy (`largefr.eval.verification`) and TAR at FAR from the pair
  cosines (`largefr.eval.roc`), as for the .bin sets.
- *1:N split* (`split_gallery`): a share of the identities (`nonmated_fraction`) is left out of the
  gallery, all their images become non-mated probes; every other identity puts one image, drawn
  with the seed, in the gallery and the rest become mated probes. Measures: CMC (rank-1/5/10)
  and TPIR at FPIR (`largefr.eval.identification`).

The same images and seed give the same pairs and split on every machine (numpy's PCG64).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from largefr.eval.embed import ImageFolderError
from largefr.eval.identification import CMC_RANKS, identify, mated_mask
from largefr.eval.labelled_images import LabelledImages, load_labelled_images
from largefr.eval.roc import tar_at_far
from largefr.eval.search import ArraySource, sharded_search
from largefr.eval.verification import embed_images, share_range, verification_accuracy

DEFAULT_PAIRS = 6000
"""Pairs drawn when not told otherwise (LFW's count: 3000 positive, 3000 negative)."""
DEFAULT_SEED = 0
NONMATED_FRACTION = 0.2


@dataclass(kw_only=True)
class PairList:
    pairs: np.ndarray
    """P x 2 image indices."""
    issame: np.ndarray
    """P bools."""


def identity_members(labels: np.ndarray) -> list[np.ndarray]:
    """Image indices of each identity 0..max, ascending (one sort, not one scan per identity)."""
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=int(labels.max()) + 1))[:-1])


def _positive_pairs(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct same-identity pairs, uniform over all of them (unranked from flat indices)."""
    members = identity_members(labels)
    totals = np.array([len(m) * (len(m) - 1) // 2 for m in members], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(totals)])
    chosen = np.sort(rng.choice(int(starts[-1]), size=count, replace=False))
    out = np.empty((count, 2), dtype=np.int64)
    for row, flat in enumerate(chosen):
        identity = int(np.searchsorted(starts, flat, side="right") - 1)
        n, k = len(members[identity]), int(flat - starts[identity])
        firsts = np.arange(n) * n - np.arange(n) * (np.arange(n) + 1) // 2  # flat index of pair (i, i + 1)
        i = int(np.searchsorted(firsts, k, side="right") - 1)
        out[row] = members[identity][i], members[identity][k - firsts[i] + i + 1]
    return out


def _negative_pairs(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct different-identity pairs (a < b), drawn uniformly by rejection."""
    found: dict[tuple[int, int], None] = {}
    while len(found) < count:
        draws = np.sort(rng.integers(0, len(labels), size=(2 * count, 2)), axis=1)
        for a, b in draws[labels[draws[:, 0]] != labels[draws[:, 1]]].tolist():
            found.setdefault((a, b))
            if len(found) == count:
                break
    return np.array(list(found), dtype=np.int64).reshape(-1, 2)


def make_pairs(labels: np.ndarray, *, num_pairs: int = DEFAULT_PAIRS, seed: int = DEFAULT_SEED) -> PairList:
    """Balanced, seeded pair list (fewer pairs when the data holds fewer of either kind)."""
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(labels)
    positives = int((sizes * (sizes - 1) // 2).sum())
    negatives = math.comb(len(labels), 2) - positives
    per_kind = min(num_pairs // 2, positives, negatives)
    if per_kind < 1:
        raise ImageFolderError(f"{num_pairs} pairs asked from {len(labels)} images with {positives} positive and "
                               f"{negatives} negative pairs: need at least one of each")
    rng = np.random.default_rng(seed)
    pairs = np.concatenate([_positive_pairs(labels, per_kind, rng), _negative_pairs(labels, per_kind, rng)])
    issame = np.arange(2 * per_kind) < per_kind
    order = rng.permutation(2 * per_kind)
    return PairList(pairs=pairs[order], issame=issame[order])


def write_pairs(path: str, names: list[str], pair_list: PairList, *, note: str = "") -> None:
    """`name_a\\tname_b\\t1|0` per pair after one `#` comment line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"# largefr pair list: {len(pair_list.issame)} pairs{'; ' + note if note else ''}\n")
        for (a, b), same in zip(pair_list.pairs.tolist(), pair_list.issame.tolist()):
            handle.write(f"{names[a]}\t{names[b]}\t{int(same)}\n")


def read_pairs(path: str, names: list[str]) -> PairList:
    """A pair list written by `write_pairs`, against the images `names` (unknown names are errors)."""
    where = {name: i for i, name in enumerate(names)}
    pairs, issame = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3 or fields[2] not in ("0", "1"):
                raise ImageFolderError(f"{path}:{number}: expected 'name_a<TAB>name_b<TAB>1|0', got {line.strip()!r}")
            missing = [n for n in fields[:2] if n not in where]
            if missing:
                raise ImageFolderError(f"{path}:{number}: image {missing[0]!r} is not in the evaluated data")
            pairs.append((where[fields[0]], where[fields[1]]))
            issame.append(fields[2] == "1")
    if not pairs:
        raise ImageFolderError(f"{path}: no pairs")
    return PairList(pairs=np.array(pairs, dtype=np.int64), issame=np.array(issame))


@dataclass(kw_only=True)
class GallerySplit:
    gallery: np.ndarray
    """Image indices in the gallery."""
    probes: np.ndarray
    """Image indices used as probes (mated and non-mated)."""


def split_gallery(labels: np.ndarray, *, seed: int = DEFAULT_SEED,
                  nonmated_fraction: float = NONMATED_FRACTION) -> GallerySplit:
    """Seeded probe/gallery split (see the module docstring); identities with one image only enter the gallery."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the split does not move with the pair count
    members = identity_members(labels)
    identities = rng.permutation(len(members))
    nonmated = round(nonmated_fraction * len(identities))
    if not 0 < nonmated < len(identities):
        raise ImageFolderError(f"a non-mated share of {nonmated_fraction} leaves {nonmated} of {len(identities)} "
                               "identities out of the gallery; at least one must be out and one in")
    gallery, probes = [], [np.flatnonzero(np.isin(labels, identities[:nonmated]))]
    for identity in np.sort(identities[nonmated:]):
        pick = int(rng.integers(len(members[identity])))
        gallery.append(members[identity][pick])
        probes.append(np.delete(members[identity], pick))
    return GallerySplit(gallery=np.array(gallery, dtype=np.int64), probes=np.sort(np.concatenate(probes)))


OWN_DATA_FAR_TARGETS = (1e-3, 1e-2, 1e-1)


@dataclass(kw_only=True)
class OwnDataReport:
    source: str
    images: int
    identities: int
    pairs: int
    accuracy: float
    std: float
    best_threshold: float
    tar_at_far: list[dict]
    """One {far_target, tar, far, threshold} per target (ROC rule of largefr.eval.roc)."""
    identification: dict
    """IdentificationResult.as_dict() of the probe/gallery split."""
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def embed_labelled_images(model: nn.Module, images: LabelledImages, *, batch_size: int, image_size: int,
                          device: torch.device | str = "cpu", flip: bool = True) -> np.ndarray:
    """N x d float32 raw (flip-sum) embeddings of every image, with a progress line per chunk."""
    chunk, parts = 8 * batch_size, []
    for start in range(0, len(images), chunk):
        indices = range(start, min(start + chunk, len(images)))
        pixels = torch.from_numpy(np.stack([images.read(i, image_size) for i in indices])).permute(0, 3, 1, 2)
        parts.append(embed_images(model, pixels, batch_size=batch_size, flip=flip, device=device).cpu())
        print(f"embedded {indices[-1] + 1}/{len(images)} images", flush=True)
    return torch.cat(parts).numpy().astype(np.float32)


def identify_split(embeddings: np.ndarray, labels: np.ndarray, split: GallerySplit):
    """CMC and TPIR at FPIR of the split's probes against its gallery (cosine of normalized embeddings)."""
    normalized = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    probe_labels, gallery_labels = labels[split.probes], labels[split.gallery]
    search = sharded_search(normalized[split.probes], probe_labels,
                            ArraySource(normalized[split.gallery], gallery_labels), k=max(CMC_RANKS), far_targets=())
    return identify("1:N split", search.scores, search.labels, probe_labels, mated_mask(probe_labels, gallery_labels),
                    len(split.gallery))


def evaluate_own_data(model: nn.Module, images: LabelledImages, pair_list: PairList, *, batch_size: int,
                      image_size: int, seed: int = DEFAULT_SEED, nonmated_fraction: float = NONMATED_FRACTION,
                      device: torch.device | str = "cpu", flip: bool = True, num_folds: int = 10) -> OwnDataReport:
    """Pair verification (accuracy, TAR at FAR) and 1:N identification of one labelled image set."""
    started = time.perf_counter()
    split = split_gallery(images.labels, seed=seed, nonmated_fraction=nonmated_fraction)
    embeddings = embed_labelled_images(model, images, batch_size=batch_size, image_size=image_size, device=device,
                                       flip=flip)
    pair_embeddings = embeddings[pair_list.pairs.reshape(-1)]
    accuracy = verification_accuracy(pair_embeddings, pair_list.issame, num_folds=num_folds)
    normalized = pair_embeddings / np.linalg.norm(pair_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    cosines = np.sum(normalized[0::2].astype(np.float64) * normalized[1::2], axis=1)
    return OwnDataReport(source=images.source, images=len(images), identities=len(images.identities),
                         pairs=len(pair_list.issame), accuracy=accuracy.accuracy, std=accuracy.std,
                         best_threshold=accuracy.best_threshold,
                         tar_at_far=[asdict(t) for t in tar_at_far(cosines, pair_list.issame, OWN_DATA_FAR_TARGETS)],
                         identification=identify_split(embeddings, images.labels, split).as_dict(),
                         seconds=time.perf_counter() - started)


def format_own_data_report(report: OwnDataReport) -> str:
    tars = "  ".join(f"TAR@FAR={t['far_target']:.0e} {100 * t['tar']:.2f}%" for t in report.tar_at_far)
    ident = report.identification
    fpir = "  ".join(f"TPIR@FPIR={t['target']:.0e} {100 * t['rate']:.2f}%" for t in ident["tpir_at_fpir"])
    cmc = "  ".join(f"rank-{r} {100 * v:.2f}%" for r, v in ident["cmc"].items())
    return "\n".join([
        f"{report.source}: {report.images} images, {report.identities} identities, {report.seconds:.1f} s",
        f"1:1  {report.pairs} pairs: accuracy {100 * report.accuracy:.2f}% +- {100 * report.std:.2f}  {tars}",
        f"1:N  {ident['probes']} probes ({ident['mated_probes']} mated), gallery {ident['gallery']}: {cmc}  {fpir}"])


def load_own_data_share(path: str, *, image_size: int, rank: int = 0, world_size: int = 1,
                        cache_dir: str | None = None) -> tuple[torch.Tensor, list[bool], int]:
    """As `largefr.eval.verification.load_verification_share`, for an identity folder or .rec used as a
    verification set: the pairs of `make_pairs` with the default count and seed, images in pair order."""
    images = load_labelled_images(path, cache_dir=cache_dir)
    pair_list = make_pairs(images.labels)
    order = pair_list.pairs.reshape(-1)
    start, end = share_range(len(order), world_size, rank)
    share = [images.read(int(i), image_size) for i in order[start:end]]
    pixels = (torch.from_numpy(np.stack(share)).permute(0, 3, 1, 2).contiguous() if share
              else torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8))
    return pixels, pair_list.issame.tolist(), len(order)
