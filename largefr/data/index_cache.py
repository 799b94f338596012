"""Scans of the files of a record set, cached per file and run in parallel over files.

Each .rec's scan (largefr/data/scan.py) is saved as `<stem>.image-index-<tag>.npz` beside the data
(or under data.cache_dir when the data folder is read-only), the tag being the sizes and modification
times of the .rec and its .idx: a changed file is scanned again, alone. A scan with a broken record
(wrong magic, truncated, offset past the end, ...) is not cached: the error names the record.
Files to scan are shared between worker processes; a progress line every `progress_every` seconds
gives files, records, records/s and the ETA.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

import numpy as np

from largefr.data.rec_set import RecFile
from largefr.data.recordio import RecordFile, RecordIOError, unpack_header
from largefr.data.scan import NOT_IMAGE, OK, PAST_END, PROBLEMS, scan_file

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".image-index-"
"""Cache files are `<stem>.image-index-<tag>.npz` (what the scan of <stem>.rec found)."""
DALI_INDEX_SUFFIX = ".dali-index-"
"""The set's index for DALI: `<stem of the first file>.dali-index-<set tag>.idx`."""
LOCK_NAME = "image-index.lock"


def cache_base(cache_dir: str | None) -> str:
    """Where largefr keeps what it derives from data: `cache_dir`, else $LARGEFR_CACHE, else ~/.cache/largefr."""
    return cache_dir or os.environ.get("LARGEFR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "largefr")


def cache_dir_for(data_dir: str, cache_dir: str | None) -> str:
    """The data folder itself when writable and no cache_dir is set, else a folder per data folder."""
    if cache_dir is None and os.access(data_dir, os.W_OK):
        return data_dir
    folder = os.path.join(cache_base(cache_dir), hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    return folder


def file_tag(file: RecFile) -> str:
    idx_stat, rec_stat = os.stat(file.idx), os.stat(file.rec)
    return f"{idx_stat.st_size}-{idx_stat.st_mtime_ns}-{rec_stat.st_size}-{rec_stat.st_mtime_ns}"


def cache_path(file: RecFile, cache_dir: str | None) -> str:
    stem = os.path.splitext(os.path.basename(file.rec))[0]
    return os.path.join(cache_dir_for(os.path.dirname(os.path.abspath(file.rec)), cache_dir),
                        f"{stem}{CACHE_SUFFIX}{file_tag(file)}.npz")


@contextlib.contextmanager
def exclusive(lock_path: str) -> Iterator[None]:
    """One process at a time (an flock): the ranks of a node scan once, not once each.

    A rank that fails the scan releases the lock; the next one scans and fails the same way, so every
    rank still reports the problem itself.
    """
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:  # a file system without locks: every rank scans, as correct, only slower
            logger.info("%s: no file lock (%s); this rank scans on its own", lock_path, err)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def describe_record(file: RecFile, key: int, offset: int, problem: int) -> str:
    """The reader's own words for a broken record (length, magic, flag), else the problem's."""
    if problem == PAST_END:
        size = os.path.getsize(file.rec)
        return (f"{file.idx}: key {key} points at offset {offset}, past the end of {file.rec} ({size} bytes): "
                "the .rec is truncated or the .idx belongs to another file")
    try:
        unpack_header(RecordFile(file.rec).read_at(offset, key))
    except RecordIOError as err:
        return str(err)
    return f"{file.rec} key {key} (offset {offset}): {PROBLEMS[problem]}"


def scan_to_cache(file: RecFile, path_npz: str, progress_every: float | None = None) -> int:
    """Scan one file and save its usable and not-image records; the number of records scanned."""
    started, shown = time.monotonic(), [time.monotonic()]

    def report(done: int, total: int) -> None:
        if progress_every is not None and time.monotonic() - shown[0] >= progress_every:
            shown[0] = time.monotonic()
            rate = done / max(shown[0] - started, 1e-9)
            print(f"scanning {file.rec}: {done}/{total} records, {rate:,.0f} records/s, "
                  f"ETA {(total - done) / max(rate, 1e-9):.0f} s", file=sys.stderr, flush=True)

    found = scan_file(file.rec, file.idx, progress=report)
    broken = np.flatnonzero((found.problems != OK) & (found.problems != NOT_IMAGE))
    if broken.size:
        i = int(broken[0])
        raise RecordIOError(describe_record(file, int(found.keys[i]), int(found.offsets[i]),
                                            int(found.problems[i]))
                            + f" ({broken.size} broken records in {file.rec}; tools/rec.py verify lists them)")
    not_image = found.problems == NOT_IMAGE
    kept = (found.keys, found.offsets, found.labels)
    if not_image.any():  # a copy only when something is left out
        kept = tuple(column[~not_image] for column in kept)
    tmp = f"{path_npz}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, keys=kept[0], offsets=kept[1], labels=kept[2],
                 bad_keys=found.keys[not_image], bad_offsets=found.offsets[not_image])
    os.replace(tmp, path_npz)
    _remove_older(path_npz, CACHE_SUFFIX, ".npz")
    return len(found.keys)


def _scan_job(file: RecFile, path_npz: str) -> int:
    return scan_to_cache(file, path_npz)


def scan_missing(files: Sequence[RecFile], paths: Sequence[str], *, workers: int,
                 progress_every: float | None) -> None:
    """Scan the files whose cache is missing, `workers` processes at a time, with progress lines."""
    todo = [(file, path) for file, path in zip(files, paths) if not os.path.exists(path)]
    if not todo:
        return
    started, shown, records = time.monotonic(), time.monotonic(), 0
    if workers <= 1 or len(todo) == 1:
        for done, (file, path) in enumerate(todo, 1):
            records += scan_to_cache(file, path, progress_every)
            shown = _progress(done, len(todo), records, started, shown, progress_every)
        return
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold torch's threads
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
        jobs = [pool.submit(_scan_job, file, path) for file, path in todo]
        for done, job in enumerate(concurrent.futures.as_completed(jobs), 1):
            records += job.result()
            shown = _progress(done, len(todo), records, started, shown, progress_every)


def _progress(done: int, total: int, records: int, started: float, shown: float,
              progress_every: float | None, out: TextIO = sys.stderr) -> float:
    now = time.monotonic()
    if progress_every is None or (now - shown < progress_every and done < total) or now - started < 1.0:
        return shown
    rate = records / max(now - started, 1e-9)
    eta = (now - started) * (total - done) / done
    print(f"scanned {done}/{total} files, {records:,} records, {rate:,.0f} records/s, ETA {eta:.0f} s",
          file=out, flush=True)
    return now


def set_tag(files: Sequence[RecFile]) -> str:
    digest = hashlib.sha1()
    for file in files:
        digest.update(f"{os.path.abspath(file.rec)}\0{file_tag(file)}\0".encode())
    return digest.hexdigest()[:16]


def write_dali_index(path: str, keys: np.ndarray, offsets: np.ndarray, file_starts: np.ndarray,
                     rec_paths: Sequence[str]) -> None:
    """A `key\\toffset` index of these records for DALI's mxnet reader over all `rec_paths` at once.

    DALI 2.4.0 takes one index for several .rec files; its offsets are global: the position in the
    files laid end to end (the offset inside file f plus the sizes of the files before it).
    """
    bases = np.concatenate([[0], np.cumsum([os.path.getsize(p) for p in rec_paths])[:-1]]).astype(np.int64)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        for number in range(len(rec_paths)):
            for start in range(int(file_starts[number]), int(file_starts[number + 1]), 1 << 20):
                end = min(start + (1 << 20), int(file_starts[number + 1]))
                lines = np.char.add(np.char.add(keys[start:end].astype(str), "\t"),
                                    (offsets[start:end] + bases[number]).astype(str))
                f.write("\n".join(lines.tolist()) + "\n")
    os.replace(tmp, path)
    _remove_older(path, DALI_INDEX_SUFFIX, ".idx")


def _remove_older(path: str, suffix: str, extension: str) -> None:
    """Derived files of earlier versions of the same data (another tag): never read again."""
    folder, name = os.path.split(path)
    prefix = name.split(suffix, 1)[0] + suffix
    for other in os.listdir(folder):
        if other.startswith(prefix) and other.endswith(extension) and other != name:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, other))
