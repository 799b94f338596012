"""Check every record of a record set, and describe what it holds (tools/rec.py verify, stats).

verify: per file, the index (lines, duplicate keys, header-declared keys), then every image record
with the vectorised scan (largefr/data/scan.py: magic, lengths, offsets inside the file, payload
header, integral label, image signature), the labels against the class count, and optionally a full
decode of every image in worker processes. Every bad record is named: file, key, offset, problem.
stats: identities, images, images per identity (histogram), and the formats and sizes of the images
(read from a sample of records, or all).
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from largefr.data.index_cache import describe_record
from largefr.data.rec_set import RecFile, RecSet, resolve_rec_set
from largefr.data.recordio import RecordFile, RecordIOError
from largefr.data.scan import OK, PROBLEM_KINDS, PROBLEMS, scan_file

_DECODE_CHUNK = 2048
_DESCRIBED_PER_FILE = 1000
"""Bad records of one file described with the reader's words; the rest with the problem's."""


@dataclass
class Finding:
    """One bad record (key and offset None: a problem of the whole file, e.g. its index)."""

    file: str
    key: int | None
    offset: int | None
    problem: str
    kind: str
    """Short name: scan.PROBLEM_KINDS, 'label_range', 'undecodable' or 'index'."""

    def __str__(self) -> str:
        if self.problem.startswith(os.path.splitext(self.file)[0]):  # the reader's words name file (.rec or .idx)
            return self.problem
        where = self.file if self.key is None else f"{self.file} key {self.key} (offset {self.offset})"
        return f"{where}: {self.problem}"


@dataclass
class VerifyReport:
    files: int = 0
    records: int = 0
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        counts = collections.Counter(f.kind for f in self.findings)
        return {"files": self.files, "records": self.records, "bad_records": len(self.findings),
                "seconds": round(self.seconds, 3), "problems": dict(counts),
                "findings": [{"file": f.file, "key": f.key, "offset": f.offset, "kind": f.kind, "problem": f.problem}
                             for f in self.findings]}


def _decode_failures(path_rec: str, keys: list[int], offsets: list[int]) -> list[tuple[int, int, str]]:
    """(key, offset, problem) of the records whose image does not decode (runs in a worker)."""
    from PIL import Image

    file, out = RecordFile(path_rec), []
    try:
        for key, offset in zip(keys, offsets):
            try:
                _, data = file.read_sample_at(offset, key)
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except Exception as err:  # any failure to read or decode is the record's problem
                out.append((key, offset, f"undecodable image ({type(err).__name__}: {err})"))
    finally:
        file.close()
    return out


def _verify_file(file: RecFile, num_classes: int | None) -> tuple[int, list[Finding], np.ndarray, np.ndarray]:
    """(records, findings, keys and offsets of the usable records) of one file."""
    try:
        found = scan_file(file.rec, file.idx)
    except RecordIOError as err:
        return 0, [Finding(file.rec, None, None, str(err), "index")], np.empty(0, np.int64), np.empty(0, np.int64)
    findings = []
    for number, i in enumerate(np.flatnonzero(found.problems != OK)):
        key, offset, code = int(found.keys[i]), int(found.offsets[i]), int(found.problems[i])
        text = describe_record(file, key, offset, code) if number < _DESCRIBED_PER_FILE else PROBLEMS[code]
        findings.append(Finding(file.rec, key, offset, text, PROBLEM_KINDS[code]))
    usable = found.problems == OK
    if num_classes is not None:
        for i in np.flatnonzero(usable & ((found.labels < 0) | (found.labels >= num_classes))):
            findings.append(Finding(file.rec, int(found.keys[i]), int(found.offsets[i]),
                                    f"label {int(found.labels[i])} is outside [0, {num_classes})", "label_range"))
            usable[i] = False
    return len(found.keys), findings, found.keys[usable], found.offsets[usable]


def verify(rec: str | Sequence[str], *, num_classes: int | None = None, decode: bool = False, workers: int = 1,
           progress: TextIO | None = sys.stderr, progress_every: float = 10.0) -> VerifyReport:
    """Check every record of the set `rec` names (num_classes: from its property file when None)."""
    started = shown = time.monotonic()
    rec_set = resolve_rec_set(rec)
    if num_classes is None and rec_set.property() is not None:
        num_classes = rec_set.property()[0]
    report = VerifyReport(files=len(rec_set.files))
    to_decode = []
    for number, file in enumerate(rec_set.files, 1):
        records, findings, keys, offsets = _verify_file(file, num_classes)
        report.records += records
        report.findings += findings
        if decode:
            to_decode.append((file.rec, keys, offsets))
        if progress is not None and time.monotonic() - shown >= progress_every:
            shown = time.monotonic()
            print(f"checked {number}/{len(rec_set.files)} files, {report.records:,} records, "
                  f"{len(report.findings)} bad", file=progress, flush=True)
    if decode:
        report.findings += _decode_all(to_decode, workers, progress, progress_every)
    report.seconds = time.monotonic() - started
    return report


def _decode_all(jobs: list[tuple[str, np.ndarray, np.ndarray]], workers: int, progress: TextIO | None,
                progress_every: float) -> list[Finding]:
    chunks = [(path, keys[s:s + _DECODE_CHUNK].tolist(), offsets[s:s + _DECODE_CHUNK].tolist())
              for path, keys, offsets in jobs for s in range(0, len(keys), _DECODE_CHUNK)]
    total, done, started, shown, findings = sum(len(c[1]) for c in chunks), 0, time.monotonic(), time.monotonic(), []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=context) as pool:
        futures = {pool.submit(_decode_failures, *chunk): chunk for chunk in chunks}
        for future in concurrent.futures.as_completed(futures):
            path, keys, _ = futures[future]
            findings += [Finding(path, key, offset, problem, "undecodable")
                         for key, offset, problem in future.result()]
            done += len(keys)
            if progress is not None and time.monotonic() - shown >= progress_every:
                shown = time.monotonic()
                rate = done / max(shown - started, 1e-9)
                print(f"decoded {done:,}/{total:,} images, {rate:,.0f} images/s, ETA "
                      f"{(total - done) / max(rate, 1e-9):.0f} s", file=progress, flush=True)
    return sorted(findings, key=lambda f: (f.file, f.offset or 0))


# ---------------------------------------------------------------------------------------------
# stats


def identity_histogram(labels: np.ndarray) -> dict[str, int]:
    """Identities by images per identity, in power-of-two bins ('1', '2-3', '4-7', ...)."""
    per_identity = np.bincount(labels)
    per_identity = per_identity[per_identity > 0]
    bins = np.floor(np.log2(per_identity)).astype(np.int64)
    counts = np.bincount(bins)
    return {("1" if b == 0 else f"{1 << b}-{(1 << (b + 1)) - 1}"): int(c) for b, c in enumerate(counts) if c}


def image_kinds(rec_set: RecSet, index, sample: int, seed: int = 0) -> tuple[dict[str, int], dict[str, int]]:
    """(format counts, size counts 'WxH') of `sample` records drawn evenly (0: every record)."""
    from PIL import Image

    positions = np.arange(len(index)) if sample <= 0 or sample >= len(index) else \
        np.sort(np.random.default_rng(seed).choice(len(index), sample, replace=False))
    files = [RecordFile(f.rec) for f in rec_set.files]
    formats, sizes = collections.Counter(), collections.Counter()
    for position in positions.tolist():
        path, key, offset = index.record(position)
        _, data = files[index.file_of(position)].read_sample_at(offset, key)
        try:
            with Image.open(io.BytesIO(data)) as image:
                formats[str(image.format).lower()] += 1
                sizes[f"{image.width}x{image.height}"] += 1
        except Exception:  # counted, not fatal: verify names such records
            formats["unreadable"] += 1
    for file in files:
        file.close()
    return dict(formats.most_common()), dict(sizes.most_common())


def stats(rec: str | Sequence[str], *, sample: int = 10000, cache_dir: str | None = None,
          workers: int | None = None) -> dict:
    """Identities, images, the images-per-identity histogram, image formats and sizes of a set."""
    from largefr.data.image_index import prepare_image_index

    rec_set = resolve_rec_set(rec)
    index = prepare_image_index(rec, on_bad_image="skip", cache_dir=cache_dir, workers=workers)
    formats, sizes = image_kinds(rec_set, index, sample)
    per_identity = np.bincount(index.labels)
    present = per_identity[per_identity > 0]
    return {"files": len(rec_set.files), "images": len(index), "records_not_images": len(index.bad_keys),
            "identities": int(present.size), "property": rec_set.property(),
            "images_per_identity": {"min": int(present.min()), "median": float(np.median(present)),
                                    "mean": round(float(present.mean()), 3), "max": int(present.max()),
                                    "histogram": identity_histogram(index.labels)},
            "sampled_images": len(index) if sample <= 0 else min(sample, len(index)),
            "formats": formats, "sizes": sizes}
