"""IJB-B / IJB-C 1:N identification from the protocol files insightface's `IJB_1N.py` reads.

Besides the 1:1 meta files (`largefr.eval.ijb`: images, landmarks, detector scores, template and
media ids), `root/meta` holds three CSV files, each with a header line and one row per image
(TEMPLATE_ID, SUBJECT_ID, FILENAME, ...; only the first two columns are used, as insightface does)::

    <target>_1N_gallery_G1.csv    gallery set 1: one template per subject
    <target>_1N_gallery_G2.csv    gallery set 2: other subjects, disjoint from G1
    <target>_1N_probe_mixed.csv   probe templates (stills and video frames mixed)

Template features are pooled exactly as in the 1:1 evaluation (`largefr.eval.ijb.template_features`:
flip-sum embedding x detector score, media mean, template sum, L2 norm). Measures
(`largefr.eval.identification`): for each gallery, probes whose subject is in it are mated, the
others non-mated (open set, the protocol's design: G1 and G2 split the subjects); CMC at ranks
1/5/10 over the mated probes and TPIR at FPIR 1e-1/1e-2; then the mean of G1 and G2. The row
"G1+G2" searches the union of both galleries, where every probe has a mate (closed set): that is
the setting of insightface's `IJB_1N.py`, which reports its CMC.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from largefr.eval.identification import (CMC_RANKS, FPIR_TARGETS, IdentificationResult, average_results,
                                         identify, mated_mask)
from largefr.eval.ijb import IJBError, IJBMeta, embed_ijb_images, find_ijb_root, read_ijb_meta, template_features
from largefr.eval.search import ArraySource, sharded_search

IJB_1N_SETS = ("gallery_G1", "gallery_G2", "probe_mixed")


@dataclass(kw_only=True)
class TemplateSubjects:
    path: str
    templates: np.ndarray
    """Sorted unique template ids."""
    subjects: np.ndarray
    """Subject id of each template."""


def one_to_n_path(root: str, target: str, kind: str) -> str:
    return os.path.join(root, "meta", f"{target.lower()}_1N_{kind}.csv")


def read_template_subjects(path: str) -> TemplateSubjects:
    """Unique (template id, subject id) of a 1:N CSV; a template with two subjects is an error."""
    if not os.path.isfile(path):
        raise IJBError(f"{path}: no such file (the 1:N protocol files come with insightface's IJB pack)")
    subject_of: dict[int, int] = {}
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().split(",")
        if header[0].strip().lstrip("-").isdigit():
            raise IJBError(f"{path}:1: expected a header line (TEMPLATE_ID,SUBJECT_ID,...), found data")
        for number, line in enumerate(handle, start=2):
            fields = line.strip().split(",")
            if fields == [""]:
                continue
            try:
                template, subject = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise IJBError(f"{path}:{number}: expected TEMPLATE_ID,SUBJECT_ID,... integers: "
                               f"{line.strip()!r}") from None
            if subject_of.setdefault(template, subject) != subject:
                raise IJBError(f"{path}:{number}: template {template} has subject {subject} here but "
                               f"{subject_of[template]} on an earlier line")
    if not subject_of:
        raise IJBError(f"{path}: no rows after the header")
    templates = np.array(sorted(subject_of), dtype=np.int64)
    return TemplateSubjects(path=path, templates=templates, subjects=np.array([subject_of[t] for t in templates]))


def read_one_to_n(root: str, target: str, known_templates: np.ndarray) -> dict[str, TemplateSubjects]:
    """The three 1:N sets, each checked to name only templates of the face_tid_mid file."""
    sets = {kind: read_template_subjects(one_to_n_path(root, target, kind)) for kind in IJB_1N_SETS}
    for kind, members in sets.items():
        unknown = members.templates[~np.isin(members.templates, known_templates)]
        if unknown.size:
            raise IJBError(f"{members.path}: template {int(unknown[0])} ({unknown.size} such) has no image in the "
                           "face_tid_mid file")
    return sets


def _features_of(templates: np.ndarray, pooled_templates: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    return pooled[np.searchsorted(pooled_templates, templates)]


def identify_templates(name: str, probe: TemplateSubjects, gallery: TemplateSubjects, features: np.ndarray,
                       feature_templates: np.ndarray, *, closed_set: bool = False) -> IdentificationResult:
    """CMC and (open set) TPIR at FPIR of the probe templates against one gallery of templates."""
    probe_features = _features_of(probe.templates, feature_templates, features)
    gallery_features = _features_of(gallery.templates, feature_templates, features)
    search = sharded_search(probe_features.astype(np.float32), probe.subjects,
                            ArraySource(gallery_features.astype(np.float32), gallery.subjects), k=max(CMC_RANKS),
                            far_targets=())
    return identify(name, search.scores, search.labels, probe.subjects, mated_mask(probe.subjects, gallery.subjects),
                    len(gallery.templates), cmc_ranks=CMC_RANKS, fpir_targets=FPIR_TARGETS, closed_set=closed_set,
                    probe_names=[f"{probe.path}: probe template {t} (subject {s})"
                                 for t, s in zip(probe.templates, probe.subjects)])


def _union(first: TemplateSubjects, second: TemplateSubjects) -> TemplateSubjects:
    templates = np.concatenate([first.templates, second.templates])
    order = np.argsort(templates, kind="stable")
    return TemplateSubjects(path=f"{first.path} + {second.path}", templates=templates[order],
                            subjects=np.concatenate([first.subjects, second.subjects])[order])


def score_one_to_n(meta: IJBMeta, image_features: np.ndarray, *,
                   use_detector_score: bool = True) -> list[IdentificationResult]:
    """G1, G2, their mean and the closed-set G1+G2 from per-image embeddings in meta order."""
    weights = meta.detector_scores if use_detector_score else None
    pooled_templates, pooled = template_features(image_features, meta.template_ids, meta.media_ids, weights)
    sets = read_one_to_n(meta.root, meta.target, pooled_templates)
    probe, first, second = sets["probe_mixed"], sets["gallery_G1"], sets["gallery_G2"]
    per_gallery = [identify_templates(name, probe, gallery, pooled, pooled_templates)
                   for name, gallery in (("G1", first), ("G2", second))]
    closed = identify_templates("G1+G2", probe, _union(first, second), pooled, pooled_templates, closed_set=True)
    return [*per_gallery, average_results("mean", per_gallery), closed]


def evaluate_ijb_1n(model: nn.Module, root: str, target: str, *, batch_size: int, device: torch.device | str = "cpu",
                    workers: int = 4, flip: bool = True, use_detector_score: bool = True
                    ) -> tuple[list[IdentificationResult], float]:
    """(results of score_one_to_n, seconds) of the whole 1:N protocol on the IJB folder `root`."""
    started = time.perf_counter()
    root = find_ijb_root(root, target)
    meta = read_ijb_meta(root, target, with_pairs=False)
    read_one_to_n(root, target, np.unique(meta.template_ids))  # fail before embedding every crop
    image_features = embed_ijb_images(model, meta, batch_size=batch_size, device=device, flip=flip, workers=workers)
    results = score_one_to_n(meta, image_features, use_detector_score=use_detector_score)
    return results, time.perf_counter() - started
