"""One large-gallery search run (tools/eval_search.py): inputs, spawned ranks, peak memory, brute-force check.

Inputs are .npy files (probes, gallery and their int labels, e.g. written by tools/embed.py; read
memory-mapped, so a rank touches only its share of the gallery) or a synthetic set
(`synthetic_identities`): random unit identity centres, one gallery and one probe vector per
identity = normalize(centre + noise * N(0, I/d)), plus non-mated probes of identities the gallery
lacks. Distractors follow the gallery: `RandomDistractors` (random unit vectors, seeded) or a .npy.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from largefr.distributed.spawn import run_ranks
from largefr.eval.identification import SEARCH_FAR_TARGETS
from largefr.eval.search import (ArraySource, ConcatSource, GallerySource, RandomDistractors, SearchError,
                                 check_embeddings, search_report, sharded_search)
from largefr.eval.verification import share_range


@dataclass(kw_only=True)
class SearchJob:
    probes: str | None = None
    probe_labels: str | None = None
    gallery: str | None = None
    gallery_labels: str | None = None
    synthetic_identities: int = 0
    """> 0: generate probes and gallery (see the module docstring) instead of reading files."""
    synthetic_nonmated: int = 0
    noise: float = 1.0
    distractors: int = 0
    """Random unit distractors appended to the gallery."""
    distractor_file: str | None = None
    embedding_size: int = 512
    seed: int = 0
    k: int = 10
    block_rows: int = 65536
    probe_rows: int = 1024
    far_targets: tuple[float, ...] = SEARCH_FAR_TARGETS
    device: str = "cpu"
    progress_every: float = 10.0


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def synthetic_set(job: SearchJob) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(probes, probe labels, gallery, gallery labels) of the synthetic set."""
    rng = np.random.default_rng([job.seed, 2])
    identities, d = job.synthetic_identities, job.embedding_size
    centres = _unit(rng.standard_normal((identities + job.synthetic_nonmated, d)))
    spread = job.noise / np.sqrt(d)
    gallery = _unit(centres[:identities] + spread * rng.standard_normal((identities, d)))
    probes = _unit(centres + spread * rng.standard_normal(centres.shape))
    return probes, np.arange(len(centres)), gallery, np.arange(identities)


def _load(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise SearchError(f"{what} {path}: cannot read as .npy ({error})") from None


def load_inputs(job: SearchJob) -> tuple[np.ndarray, np.ndarray, GallerySource]:
    """(probes, probe labels, whole gallery source: labelled gallery then distractors)."""
    if job.synthetic_identities:
        probes, probe_labels, gallery, gallery_labels = synthetic_set(job)
    else:
        probes, gallery = _load(job.probes, "--probes"), _load(job.gallery, "--gallery")
        probe_labels, gallery_labels = _load(job.probe_labels, "--probe-labels"), _load(job.gallery_labels,
                                                                                        "--gallery-labels")
        if len(probe_labels) != len(probes):
            raise SearchError(f"--probe-labels {job.probe_labels}: {len(probe_labels)} labels for {len(probes)} probes")
    sources: list[GallerySource] = [ArraySource(gallery, gallery_labels, name="--gallery")]
    if job.distractor_file:
        sources.append(ArraySource(_load(job.distractor_file, "--distractor-file"), None, name="--distractor-file"))
    if job.distractors:
        sources.append(RandomDistractors(job.distractors, sources[0].dim, job.seed))
    return np.asarray(probes, dtype=np.float32), np.asarray(probe_labels, dtype=np.int64), ConcatSource(sources)


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def search_rank(rank: int, world: int, job: SearchJob) -> dict:
    """One rank's run: its share, the merged result and report, its peak memory before and after the search."""
    import torch.distributed as dist

    device = f"cuda:{rank}" if job.device == "cuda" else job.device
    probes, probe_labels, source = load_inputs(job)
    before = peak_memory_mib()
    result = sharded_search(probes, probe_labels, source, k=job.k, far_targets=job.far_targets,
                            block_rows=job.block_rows, probe_rows=job.probe_rows, device=device,
                            group=dist.group.WORLD, progress_every=job.progress_every)
    memory = {"rank": rank, "share": share_range(source.rows, world, rank), "peak_rss_mib_before_search": before,
              "peak_rss_mib": peak_memory_mib()}
    if job.device == "cuda":
        memory["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if rank:
        return {"memory": memory}
    return {"memory": memory, "result": result, "report": search_report(result, probe_labels,
                                                                        far_targets=job.far_targets)}


def run_search(job: SearchJob, world: int) -> tuple[dict, list[dict]]:
    """(rank 0's answer, every rank's memory) of the job on `world` spawned ranks (gloo; nccl for cuda)."""
    probes, probe_labels, source = load_inputs(job)  # input errors here, as one message, not in every rank
    check_embeddings(probes, probe_labels, source)
    backend = "nccl" if job.device == "cuda" else "gloo"
    answers = run_ranks(search_rank, world, job, backend=backend, threads=max(1, torch.get_num_threads() // world))
    return answers[0], [a["memory"] for a in answers]


def brute_force_check(job: SearchJob, indices: np.ndarray, probes_checked: int) -> dict:
    """Candidate lists of the first probes by a plain float64 full sort of every gallery row."""
    started = time.perf_counter()
    probes, _, source = load_inputs(job)
    probes = probes[:probes_checked].astype(np.float64)
    scores = np.empty((len(probes), source.rows))
    for first in range(0, source.rows, job.block_rows):
        last = min(first + job.block_rows, source.rows)
        scores[:, first:last] = probes @ source.read(first, last).astype(np.float64).T
    rows = np.arange(source.rows)
    expected = np.array([np.lexsort((rows, -row))[:job.k] for row in scores])
    equal = int(np.sum(np.all(expected == indices[:probes_checked], axis=1)))
    return {"probes_checked": len(probes), "lists_equal": equal, "seconds": time.perf_counter() - started}


def job_summary(job: SearchJob) -> dict:
    return asdict(job)
