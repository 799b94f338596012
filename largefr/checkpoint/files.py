"""Checkpoint files: names, the manifest, safe loading, plain-data checks and hashing.

Layout of one checkpoint directory ``<root>/step_<N>/``::

    engine/                       DeepSpeed's engine checkpoint (tag "engine"): module, optimizer
                                  (ZeRO partitions per data-parallel rank), or its universal form
    head_rank00000_of00004.pt     one per rank: class range, row tensors, per-rank extras
    replicated.pt                 state identical on every rank (momentum encoder, queue, step, ...)
    manifest.json                 written last: step, world size, row schema, every file's size+sha256

Everything here is file-level and collective-free; `save_load.py` does the distributed part.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import re
from typing import Any, Iterable, Mapping

import torch

from largefr.errors import UserError

FORMAT_NAME = "largefr-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPLICATED_NAME = "replicated.pt"
ENGINE_TAG = "engine"
STEP_DIR_PATTERN = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is incomplete, corrupted, unsafe or incompatible with this run."""


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def head_file_name(rank: int, world_size: int) -> str:
    return f"head_rank{rank:05d}_of{world_size:05d}.pt"


HEAD_FILE_PATTERN = re.compile(r"^head_rank\d{5}_of\d{5}\.pt$")
"""Names `head_file_name` gives."""


# ---------------------------------------------------------------------------------------------
# Plain data and safe loading

_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None), torch.dtype, torch.Size)


def check_plain(value: Any, where: str) -> None:
    """Raise if `value` holds anything `torch.load(weights_only=True)` could not read back.

    Checked at save time so that a checkpoint that could never be resumed fails when written,
    naming the offending key, instead of at resume time.
    """
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, (dict, collections.OrderedDict)):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}: checkpoints hold only tensors, numbers, "
        "strings and dicts/lists/tuples of them (loaded with weights_only=True); convert it (numpy arrays "
        "with torch.from_numpy, objects with their state_dict())"
    )


def check_shapes(file: str, prefix: str, saved: Any, live: Mapping[str, Any], fix: str) -> None:
    """Raise naming `file` and the key when a saved state dict's tensors do not match the live one's by name
    or shape (before `load_state_dict`, whose own error names no file); `fix` says what to do."""
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{file}: '{prefix}' is a {type(saved).__name__}, not a state dict; {fix}")
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise CheckpointError(f"{file}: '{prefix}' lacks keys {missing[:5]} and holds unexpected keys "
                              f"{unexpected[:5]}; {fix}")
    for key, tensor in live.items():
        value = saved[key]
        if isinstance(tensor, torch.Tensor) and (not isinstance(value, torch.Tensor) or value.shape != tensor.shape):
            shown = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{file}: key '{prefix}.{key}' has shape {shown}, this run's is "
                                  f"{list(tensor.shape)}; {fix}")


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed 0.19 classes found in its own checkpoint files; constructing them runs no user code."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, *, deepspeed_file: bool = False, mmap: bool = False, map_location: str = "cpu") -> Any:
    """`torch.load(weights_only=True)`: no pickled code runs; a file that needs it is refused.

    `deepspeed_file` allows the few DeepSpeed classes its engine files contain. `mmap` maps tensor
    storage instead of reading it (cheap scans). `map_location="meta"` reads no tensor data at all
    (`largefr.checkpoint.rows.load_meta`: where the rows of a head file lie).
    """
    allowed = _deepspeed_safe_globals() if deepspeed_file else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        raise CheckpointError(
            f"{path}: refused to load: it holds a pickled object other than tensors and plain containers "
            f"({reason}). Checkpoint files are read with torch.load(weights_only=True) so that no code "
            "stored in them runs; this file was not written by largefr or was tampered with"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: cannot be read ({error}); the file is truncated or corrupted") from None


def _unpickler_reason(message: str) -> str:
    """The line of torch's long weights_only message that names the refused global."""
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(" was not an allowed", 1)[0].strip()
    return message.strip().splitlines()[0] if message.strip() else "unpickling error"


def scan_engine_files(engine_dir: str) -> None:
    """Check every DeepSpeed file under `engine_dir` loads with weights_only before DeepSpeed reads it.

    DeepSpeed 0.19 loads its own files with `weights_only=False`; a file that passes this scan
    references only allowed globals, so DeepSpeed's unrestricted load runs no foreign code. Tensor
    storage is memory-mapped, not read.
    """
    for relpath in list_files(engine_dir):
        if relpath.endswith(".pt"):
            safe_load(os.path.join(engine_dir, relpath), deepspeed_file=True, mmap=True)


def save_file(obj: Any, path: str, where: str) -> dict[str, Any]:
    """`torch.save` after checking `obj` is plain data; fsync so the manifest never outruns the data.

    Returns the file's size and sha256 (as `file_digest`), hashed from the bytes as they are written:
    no second read of the file.
    """
    check_plain(obj, where)
    with open(path, "wb") as handle:
        writer = _HashingWriter(handle)
        torch.save(obj, writer)
        handle.flush()
        os.fsync(handle.fileno())
    return {"size": writer.size, "sha256": writer.sha256.hexdigest()}


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through (torch.save writes in order, as memoryviews)."""

    def __init__(self, handle: io.BufferedWriter):
        super().__init__()
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        written = self.handle.write(data)
        self.size += written
        return written

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()


# ---------------------------------------------------------------------------------------------
# Files, hashes, fsync

def list_files(directory: str) -> list[str]:
    """Relative paths of every regular file under `directory`, sorted."""
    found = []
    for parent, _, names in os.walk(directory):
        for name in names:
            found.append(os.path.relpath(os.path.join(parent, name), directory))
    return sorted(found)


DIGEST_BLOCK_BYTES = 8 << 20
"""Bytes `file_digest` reads at a time."""


def file_digest(path: str) -> dict[str, Any]:
    """Size and sha256 of a file; also fsyncs it (files written by DeepSpeed are not)."""
    sha = hashlib.sha256()
    block = memoryview(bytearray(DIGEST_BLOCK_BYTES))  # one buffer, reused: memory stays one block
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(block):
            sha.update(block[:count])
        os.fsync(handle.fileno())
    return {"size": os.path.getsize(path), "sha256": sha.hexdigest()}


def fsync_dir(directory: str) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Manifest

def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
    path = os.path.join(directory, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(directory)


def make_manifest(*, step: int, world_size: int, num_classes: int, row_schema: Mapping[str, Any],
                  engine: Mapping[str, Any] | None, files: Mapping[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "complete": True, "step": step,
            "world_size": world_size, "num_classes": num_classes, "rows": dict(row_schema),
            "engine": dict(engine) if engine is not None else None, "files": dict(files)}


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of checkpoint directory `path`; CheckpointError saying why it is not usable."""
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(
            f"checkpoint {path} has no {MANIFEST_NAME}: it was interrupted while being written (the manifest is "
            "written last) or is not a largefr checkpoint; resume from an earlier complete checkpoint")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_path}: not a largefr checkpoint manifest (key 'format')")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format version {manifest.get('version')!r}; this largefr reads "
                              f"version {FORMAT_VERSION}")
    if manifest.get("complete") is not True:
        raise CheckpointError(f"{manifest_path}: checkpoint not marked complete (key 'complete')")
    return manifest


def validate_checkpoint(path: str) -> dict[str, Any]:
    """Manifest present and complete, every listed file present with its recorded size; returns it.

    Cheap (no hashing): used to pick the latest complete checkpoint. `verify_digests` hashes.
    """
    manifest = read_manifest(path)
    for relpath, entry in manifest["files"].items():
        file_path = os.path.join(path, relpath)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"checkpoint {path}: file {relpath} listed in the manifest is missing")
        size = os.path.getsize(file_path)
        if size != entry["size"]:
            raise CheckpointError(f"checkpoint {path}: file {relpath} has {size} bytes, the manifest records "
                                  f"{entry['size']}: it is truncated or was modified")
    world, classes = manifest["world_size"], manifest["num_classes"]
    missing = [head_file_name(r, world) for r in range(world) if head_file_name(r, world) not in manifest["files"]]
    if missing or REPLICATED_NAME not in manifest["files"] or classes < world:
        raise CheckpointError(f"checkpoint {path}: manifest lacks {missing or REPLICATED_NAME} "
                              f"(world_size {world}, num_classes {classes})")
    return manifest


def verify_digests(path: str, manifest: Mapping[str, Any], relpaths: Iterable[str]) -> None:
    """Hash the named files and compare with the manifest (detects silent corruption)."""
    for relpath in relpaths:
        check_digest(path, manifest, relpath, file_digest(os.path.join(path, relpath))["sha256"])


def check_digest(path: str, manifest: Mapping[str, Any], relpath: str, sha256: str) -> None:
    """Raise unless `sha256` (of file `relpath` of checkpoint `path`) is the one its manifest records."""
    if sha256 != manifest["files"][relpath]["sha256"]:
        raise CheckpointError(f"checkpoint {path}: file {relpath} does not match the sha256 in the manifest: "
                              "it is corrupted; resume from an earlier checkpoint")


def list_step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of every `step_<N>` directory under `root`, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)
