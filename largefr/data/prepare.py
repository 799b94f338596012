"""A run's data made ready, on every rank: `prepare_data(config, env) -> PreparedData`.

The data room's one entry for the trainer's assembly (largefr/train/build.py), the augmentation
preview and loader benchmark (largefr/data/preview.py and their tools) and the experiment runner:

1. the data folder: data.rec as given, data.images packed into the cache, or the synthetic
   quickstart set generated (one rank works, the others wait; every rank raises if it failed);
2. the counts read from the data (data.num_classes / num_images filled where null, checked where
   given, and against the number of ranks) and the records the scan left out;
3. where each verification set of data.val_targets is;
4. the loaders: `PreparedData.loader_settings()` is the training loader's `LoaderSettings`, and
   `PreparedData.open_loader(**changes)` opens it (or a variant: another batch size, no shuffle, ...).

Problems the user can fix (a missing folder, counts that do not fit) raise `DataSetupError`, naming
the path and the key.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from largefr.config import Config, DataConfig
from largefr.config_validation import world_size_issues
from largefr.data import LoaderSettings, open_loader
from largefr.data.image_index import counts_from_data, prepare_image_index
from largefr.data.pack import ensure_packed, packed_folder_for
from largefr.data.rec_set import data_folder
from largefr.data.sharding import EpochLoader
from largefr.errors import UserError

__all__ = ["DataSetupError", "LOCAL_CPU_PROCESS", "LocalProcess", "PreparedData", "RankEnv", "ensure_synthetic_data",
           "prepare_data", "prepare_data_dir", "run_on_first_rank", "training_folder", "verification_paths",
           "with_data_counts"]


class DataSetupError(UserError, RuntimeError):
    """Training or verification data that is missing or unusable; the message names the path and key."""


class RankEnv(Protocol):
    """What preparing data needs to know of this process (`largefr.train.distributed_env.DistributedEnv` has it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints progress."""


@dataclass(frozen=True, kw_only=True)
class LocalProcess:
    """A single process outside a distributed run (the preview and benchmark tools)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


LOCAL_CPU_PROCESS = LocalProcess()


# ---------------------------------------------------------------------------- the data folder

def training_folder(data: DataConfig) -> str | list[str] | None:
    """The training files: data.rec, the packed copy of data.images, else the synthetic cache folder."""
    if data.rec is not None:
        return data.rec
    if data.images is not None:
        return packed_folder_for(data.images, data.cache_dir)
    return data.synthetic.cache_dir if data.synthetic is not None else None


def run_on_first_rank(action: Callable[[], Any], what: str, *, device: torch.device) -> None:
    """Run `action` on rank 0 while the others wait; every rank raises if it failed (no hang).

    `device` is where the process group's collectives run (NCCL refuses CPU tensors).
    """
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            action()
        except Exception as exc:  # reported on every rank below
            error = f"{what} failed on rank 0: {type(exc).__name__}: {exc}"
            if not dist.is_initialized():
                raise DataSetupError(error) from exc
    if dist.is_initialized():
        flag = torch.tensor([0.0 if error is None else 1.0], device=device)
        dist.all_reduce(flag)  # the wait is bounded by the process group's timeout
        if flag.item() > 0:
            raise DataSetupError(error or f"{what} failed on rank 0 (see its error above)")


def ensure_synthetic_data(data: DataConfig, *, progress: bool = True) -> None:
    """Generate data.synthetic into its cache folder unless it already holds it (a stale one is replaced).

    One process only (two generations into one folder race): rank 0 here, or tools/ablate.py before its runs.
    """
    from largefr.data.synthetic import META_FILE, ensure_dataset  # PIL and the face renderer: only when generating

    synthetic, folder = data.synthetic, training_folder(data)
    first_time = progress and not os.path.isfile(os.path.join(folder, META_FILE))
    if first_time:  # the generator's own progress lines carry no time; these two frame them
        _stamped(f"generating the synthetic data set into {folder} (once; later runs reuse it)")
    started = time.perf_counter()
    ensure_dataset(folder, identities=synthetic.identities, images_per_identity=synthetic.images_per_identity,
                   pairs=synthetic.val_pairs, image_size=data.image_size, seed=synthetic.seed,
                   heldout_identities=synthetic.heldout_identities,
                   heldout_images_per_identity=synthetic.heldout_images_per_identity,
                   workers=max(1, min(4, os.cpu_count() or 1)), progress=progress, replace_stale=True)
    if first_time:
        _stamped(f"synthetic data set ready in {time.perf_counter() - started:.0f} s")


def _stamped(message: str) -> None:
    """A timestamped largefr line on stdout, as the run's log lines look (before the run's logger exists)."""
    print(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] largefr: {message}", flush=True)


def prepare_data_dir(data: DataConfig, env: RankEnv) -> str | list[str] | None:
    """The folder of train.rec/idx/property (packed or generated first where the config asks for it)."""
    folder = training_folder(data)
    if data.loader == "synthetic" and not data.val_targets:
        return folder
    if folder is None:
        raise DataSetupError("data.rec is not set: give the folder holding train.rec, train.idx and property "
                             "(or data.synthetic.cache_dir for a generated data set)")
    if data.images is not None:
        run_on_first_rank(lambda: ensure_packed(data.images, data.cache_dir, on_bad_image=data.on_bad_image),
                          f"packing data.images={data.images} into {folder}", device=env.device)
    elif data.rec is None and data.synthetic is not None:
        run_on_first_rank(lambda: ensure_synthetic_data(data, progress=env.is_main),
                          f"generating the synthetic data set in {folder}", device=env.device)
    missing = [entry for entry in ([folder] if isinstance(folder, str) else folder) if not os.path.exists(entry)]
    if missing:
        raise DataSetupError(f"data folder {missing[0]} (data.rec) does not exist: point data.rec at the folder holding "
                             "train.rec, train.idx and property (or shards train-00000.rec ..., a .rec file, or "
                             "a list of them)")
    return folder


# ---------------------------------------------------------------------------- counts and verification sets

def with_data_counts(config: Config, folder: str | Sequence[str] | None, world_size: int) -> tuple[Config, int]:
    """(`config` with data.num_classes / num_images read from the data where not given (checked where given),
    the number of records the scan found not to be images)."""
    data = config.data
    if data.loader == "synthetic":
        return config, 0  # nothing to count: the config check required both
    index = prepare_image_index(folder, on_bad_image=data.on_bad_image, cache_dir=data.cache_dir)
    num_classes, num_images = counts_from_data(folder, index, num_classes=data.num_classes,
                                               num_images=data.num_images)
    resolved = dataclasses.replace(config, data=dataclasses.replace(data, num_classes=num_classes,
                                                                    num_images=num_images))
    issues = world_size_issues(resolved, world_size)
    if issues:
        raise DataSetupError("; ".join(f"{key}: {problem}" for key, problem in issues)
                             + f" (counts read from the data in {folder})")
    return resolved, len(index.bad_keys)


def _verification_candidates(target: str, data: DataConfig, folder: str | Sequence[str] | None) -> list[str]:
    """Where a data.val_targets entry may be: a path (with '.bin' or a folder part) as given, relative to the
    working directory; a bare name as <name>.bin in the data folder, beside data.images, then here."""
    if target.endswith(".bin") or os.sep in target:
        return [target] if target.endswith(".bin") else [target, f"{target}.bin"]
    folders = [data_folder(folder), data.images, os.getcwd()]
    return list(dict.fromkeys(os.path.join(f, f"{target}.bin") for f in folders if f))


def verification_paths(data: DataConfig, folder: str | Sequence[str] | None) -> list[tuple[str, str]]:
    """(name, path) of every data.val_targets entry (see _verification_candidates for where it is looked for); a
    path may also be a folder of identity sub-folders or of train.rec (pairs drawn as tools/eval_folder.py draws
    them)."""
    out = []
    for target in data.val_targets:
        candidates = _verification_candidates(target, data, folder)
        path = next((c for c in candidates if os.path.isfile(c) or os.path.isdir(c)), None)
        if path is None:
            raise DataSetupError(f"verification set {target!r} (data.val_targets) not found; looked for "
                                 f"{', '.join(candidates)}. Give a .bin path (or an identity folder) relative to the "
                                 f"working directory ({os.getcwd()}) or an absolute one, or remove the entry")
        out.append((Path(path).name if os.path.isdir(path) else Path(path).stem, path))
    return out


# ---------------------------------------------------------------------------- the prepared data

@dataclass(frozen=True, kw_only=True)
class PreparedData:
    """A run's data on this rank, ready: its folder, its counts and how to open its loaders."""

    config: Config
    """The run's config with data.num_classes and data.num_images read from the data."""
    folder: str | list[str] | None
    """The training files (`training_folder`), packed or generated where needed."""
    records_left_out: int
    """Records of the data set the index scan found not to be images (data.on_bad_image=skip)."""
    env: RankEnv

    def verification_paths(self) -> list[tuple[str, str]]:
        """(name, path) of each data.val_targets entry; DataSetupError naming the places looked at if one is missing."""
        return verification_paths(self.config.data, self.folder)

    def loader_settings(self) -> LoaderSettings:
        """The training loader of this rank: train.batch_size, shuffled from train.seed, data.* as configured."""
        data, env = self.config.data, self.env
        return LoaderSettings(kind=data.loader, rec=self.folder, batch_size=self.config.train.batch_size,
                              rank=env.rank, world_size=env.world_size, num_classes=data.num_classes,
                              local_rank=env.local_rank, seed=self.config.train.seed, image_size=data.image_size,
                              num_workers=data.num_workers, shuffle=True, random_flip=data.random_flip,
                              shuffle_buffer=data.shuffle_buffer, on_bad_image=data.on_bad_image, drop_last=True,
                              num_images=data.num_images, cache_dir=data.cache_dir, device=env.device,
                              augment=data.augment)

    def open_loader(self, **changes: Any) -> EpochLoader:
        """The training loader, or with `changes` (LoaderSettings fields) a variant of it."""
        return open_loader(dataclasses.replace(self.loader_settings(), **changes))


def prepare_data(config: Config, env: RankEnv) -> PreparedData:
    """The data folder made ready and the counts read from it (every rank calls it; see the module docstring)."""
    folder = prepare_data_dir(config.data, env)
    resolved, left_out = with_data_counts(config, folder, env.world_size)
    return PreparedData(config=resolved, folder=folder, records_left_out=left_out, env=env)
