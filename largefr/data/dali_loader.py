"""NVIDIA DALI pipeline over insightface .rec files.

GPU: `device_id=local_rank`, nvJPEG "mixed" decode. CPU-only machine: `device_id=None`, CPU decode
(libjpeg-turbo; pixels identical to PIL's, so identical to the torch fallback). Same function,
device chosen at run time.

Each epoch builds a fresh pipeline: `fn.readers.mxnet` over the validated image-only index
(image_index.py) of one .rec or of every shard of a set (one index with global offsets, the form
DALI 2.4.0 accepts for several files), `shard_id=(rank + epoch) % world`, `num_shards=world`, `stick_to_shard=True`
(see sharding.py), seeded from (seed, epoch, rank). That gives exact epoch boundaries and an
exact, cheap-to-reason resume point (`skip(k)` runs and discards k batches of the epoch's pipeline);
data.augment's operators (augment_dali.py) are part of that pipeline, so a resume replays them too.
Shuffling is DALI's reservoir of `initial_fill` samples. insightface's files are sorted by
identity, so the reservoir must span many identities: with P images per identity and batch B, a
buffer of 8*B*P samples gave >= 0.84*B distinct identities in every one of 300 simulated batches
(P 5-68, B 16-128; 4*B*P fell to 0.78), so initial_fill = max(shuffle_buffer, 8 * B * P), capped
at the shard size (MS1M, B=128: ~70k samples, memory-mapped, not copied).

A .rec changed under the job: DALI's reader trusts the index, and memory-mapped it died of SIGBUS
("Fatal Python error: Bus error", no file named) when a .rec was truncated mid-run. It reads with
plain file I/O instead (`dont_use_mmap`: a failed read is an exception), and the size and
modification time of every .rec are compared with those of its scan at start-up, at every epoch's
pipeline, before every batch and after any pipeline error (`ImageIndex.check_unchanged`: one
`os.stat` per file), so each rank stops at its next batch naming the file that was truncated,
rewritten or deleted.

Undecodable images: DALI's decoder fails the whole pipeline without naming the sample, so the
loader then decodes (with PIL) the records this pipeline may have read but not yet returned, names
the bad key(s) and either raises (on_bad_image='error') or rebuilds the pipeline of this rank
without them and continues from the same batch (on_bad_image='skip'; skips counted in
`skipped_images` and logged). A rank that skipped records reads a private index of its shard, so
the shards of the other ranks and the batch count do not change.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from largefr.config import AugmentConfig
from largefr.data.image_index import ImageIndex
from largefr.data.recordio import BadImageError, RecordFile, RecordIOError
from largefr.data.sharding import EpochLoader, check_enough_samples, epoch_shard_id, shard_range
from largefr.data.torch_loader import decode_rgb
from largefr.errors import MissingExtraError

logger = logging.getLogger(__name__)
_PREFETCH_DEPTH = 2


def import_dali():
    """(nvidia.dali, fn, types, feed_ndarray), or an ImportError that names the extra to install."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as err:
        raise MissingExtraError('data.loader=dali needs NVIDIA DALI: pip install "largefr[dali]" (nvidia-dali-cuda120, '
                          "which also runs CPU-only; on CUDA 13 machines install nvidia-dali-cuda130), or set "
                          "data.loader=torch") from err
    return dali, fn, types, feed_ndarray


def build_pipeline(*, rec_paths: Sequence[str], index_path: str, batch_size: int, num_threads: int, device_id: int | None,
                   seed: int, shard_id: int, num_shards: int, shuffle: bool, initial_fill: int,
                   random_flip: bool, pad_last_batch: bool, augment: AugmentConfig | None = None,
                   image_size: int = 112):
    """Built DALI pipeline with outputs (images 3xHxW float, label, source_info of each sample).

    `rec_paths` are read as one set through the single index `index_path`, whose offsets are global
    (positions in the files laid end to end): the form DALI 2.4.0's mxnet reader takes for several
    files (it refuses more than one index file).

    `augment` (data.augment) inserts its operators between decode and normalize (augment_dali.py);
    the pipeline is then traced with DALI conditionals, so each operator runs only where its coin lands.
    """
    dali, fn, types, _ = import_dali()
    augmenting = augment is not None and augment.enabled

    def graph():
        encoded, labels = fn.readers.mxnet(
            path=list(rec_paths), index_path=[index_path], shard_id=shard_id, num_shards=num_shards,
            stick_to_shard=True, random_shuffle=shuffle, initial_fill=max(1, initial_fill),
            pad_last_batch=pad_last_batch, dont_use_mmap=True, name="reader")
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        if augmenting:
            from largefr.data.augment_dali import augment_images

            images = augment_images(images, augment, image_size)
        mirror = fn.random.coin_flip(probability=0.5) if random_flip else 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
        # a label vector (flag > 0) means class = label[0], as in insightface
        return images, labels[0], fn.get_property(encoded, key="source_info")

    pipe = dali.pipeline_def(graph, enable_conditionals=augmenting)(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
        prefetch_queue_depth=_PREFETCH_DEPTH)
    pipe.build()
    return pipe


def _pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFFFFFF)


class DaliRecLoader(EpochLoader):
    """Per-rank batches `(images float32 Bx3xHxW, labels int64 B)` from a DALI pipeline."""

    def __init__(self, index: ImageIndex, *, batch_size: int, rank: int, world_size: int, local_rank: int = 0,
                 seed: int = 0, image_size: int = 112, num_threads: int = 2, shuffle: bool = True,
                 random_flip: bool = True, shuffle_buffer: int = 10000, on_bad_image: str = "error",
                 drop_last: bool = True, device: str | torch.device | None = None,
                 augment: AugmentConfig | None = None) -> None:
        self._private_dir: str | None = None
        import_dali()  # fail at construction, not at the first batch
        index.check_unchanged()
        super().__init__()
        self.index, self.batch_size, self.rank, self.world_size = index, batch_size, rank, world_size
        self.seed, self.image_size, self.num_threads = seed, image_size, num_threads
        self.shuffle, self.random_flip, self.on_bad_image, self.drop_last = shuffle, random_flip, on_bad_image, drop_last
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.augment = augment
        """data.augment of the training batches (None or all probabilities 0: decode, flip, normalize only)."""
        self.num_batches = check_enough_samples(len(index), world_size, batch_size, drop_last, index.rec_path)
        self.initial_fill = self._initial_fill(shuffle_buffer) if shuffle else 1
        self.bad_positions: set[int] = set()
        self.skipped_images = 0
        """Records left out because DALI could not decode them (on_bad_image='skip'), all epochs."""

    def _initial_fill(self, shuffle_buffer: int) -> int:
        images_per_identity = len(self.index) / max(1, len(np.unique(self.index.labels)))
        wanted = max(shuffle_buffer, int(8 * self.batch_size * images_per_identity))
        return min(wanted, len(self.index) // self.world_size)

    # -- pipeline per epoch ---------------------------------------------------------------------

    def _shard(self, epoch: int) -> np.ndarray:
        start, end = shard_range(len(self.index), self.world_size, epoch_shard_id(self.rank, self.world_size, epoch))
        return np.arange(start, end, dtype=np.int64)

    def _pipeline(self, epoch: int):
        """(pipeline, positions it reads in file order) for this rank and epoch."""
        self.index.check_unchanged()
        shard = self._shard(epoch)
        index_path, num_shards = self.index.dali_index(), self.world_size
        shard_id = epoch_shard_id(self.rank, self.world_size, epoch)
        if self.bad_positions.intersection(shard.tolist()):
            shard = np.array([p for p in shard.tolist() if p not in self.bad_positions], dtype=np.int64)
            index_path, shard_id, num_shards = self._private_index(shard), 0, 1
        pipe = build_pipeline(rec_paths=self.index.rec_paths, index_path=index_path, batch_size=self.batch_size,
                              num_threads=self.num_threads,
                              device_id=(self.device.index or 0) if self.device.type == "cuda" else None,
                              seed=_pipeline_seed(self.seed, epoch, self.rank), shard_id=shard_id,
                              num_shards=num_shards, shuffle=self.shuffle,
                              initial_fill=min(self.initial_fill, len(shard)), random_flip=self.random_flip,
                              pad_last_batch=not self.drop_last, augment=self.augment, image_size=self.image_size)
        return pipe, shard

    def _private_index(self, positions: np.ndarray) -> str:
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="largefr-dali-")
        path = os.path.join(self._private_dir, f"rank{self.rank}.idx")
        bases = np.concatenate([[0], np.cumsum([os.path.getsize(p) for p in self.index.rec_paths])])
        with open(path, "w", encoding="ascii") as f:  # global offsets, as in the set's index
            f.writelines(f"{self.index.keys[p]}\t{self.index.offsets[p] + bases[self.index.file_of(p)]}\n"
                         for p in positions.tolist())
        return path

    # -- one batch --------------------------------------------------------------------------------

    def _positions(self, source_info) -> np.ndarray:
        """Positions in the image index of the samples of a batch, from DALI's source_info."""
        named = [bytes(np.asarray(source_info[i])).decode().rsplit(" at index ", 1) for i in range(len(source_info))]
        return np.array([self.index.position_of(path, int(offset)) for path, offset in named], dtype=np.int64)

    def _run(self, pipe) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        _, _, _, feed_ndarray = import_dali()
        images_tl, labels_tl, info_tl = pipe.run()
        positions = self._positions(info_tl)
        for i, shape in enumerate(images_tl.shape()):
            if tuple(shape) != (3, self.image_size, self.image_size):
                path, key, _ = self.index.record(int(positions[i]))
                raise RecordIOError(f"{path} key {key}: image is {shape[2]}x{shape[1]}, expected "
                                    f"{self.image_size}x{self.image_size} (data.image_size / property)")
        images = torch.empty((len(positions), 3, self.image_size, self.image_size), dtype=torch.float32,
                             device=self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        feed_ndarray(images_tl.as_tensor(), images, cuda_stream=stream)
        labels = torch.from_numpy(np.rint(labels_tl.as_array()).astype(np.int64).reshape(-1)).to(self.device)
        return images, labels, positions

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, next_batch = self.epoch, self._take_skip()
        pipe, shard = self._pipeline(epoch)
        produced, returned = 0, set()
        while next_batch < self.num_batches:
            self.index.check_unchanged()
            try:
                images, labels, positions = self._run(pipe)
            except RuntimeError as err:  # DALI's pipeline is unusable after an operator error
                del pipe
                self.index.check_unchanged()  # a file changed under the reader: named, not searched for bad images
                self._handle_decode_failure(err, shard, returned, produced)
                pipe, shard = self._pipeline(epoch)
                produced, returned = 0, set()
                continue
            returned.update(positions.tolist())
            produced += 1
            if produced <= next_batch:
                continue  # resume, or catching up after a rebuild
            next_batch += 1
            if not self.drop_last and next_batch == self.num_batches:
                keep = max(0, len(shard) - (self.num_batches - 1) * self.batch_size)  # drop DALI's padding
                images, labels = images[:keep], labels[:keep]
            yield images, labels
        del pipe

    def _handle_decode_failure(self, err: RuntimeError, shard: np.ndarray, returned: set[int], produced: int) -> None:
        """Find the undecodable records among those read but not returned; raise or remember them."""
        may_have_read = self.initial_fill + (produced + _PREFETCH_DEPTH + 1) * self.batch_size
        candidates = [p for p in shard.tolist()[:may_have_read] if p not in returned]
        files = [RecordFile(path) for path in self.index.rec_paths]
        try:
            bad = [p for p in candidates if not self._decodes(files[self.index.file_of(p)], p)]
        finally:
            for file in files:
                file.close()
        if not bad:
            raise RuntimeError(f"{self.index.rec_path}: DALI failed in epoch {self.epoch} (images "
                               f"{self.index.where(int(shard[0]))} .. {self.index.where(int(shard[-1]))}) and no "
                               f"undecodable record was found: {err}") from err
        described = ", ".join(self._described(p) for p in bad)
        if self.on_bad_image != "skip":
            raise BadImageError(f"{self.index.rec_path}: undecodable image at {described}; set "
                                "data.on_bad_image=skip to skip such records, or re-pack the data") from err
        logger.warning("%s: skipping undecodable image(s) at %s", self.index.rec_path, described)
        self.bad_positions.update(bad)
        self.skipped_images += len(bad)

    def _described(self, position: int) -> str:
        path, key, offset = self.index.record(position)
        where = f"key {key} (offset {offset})"
        return where if len(self.index.rec_paths) == 1 else f"{path} {where}"

    def _decodes(self, file: RecordFile, position: int) -> bool:
        try:
            decode_rgb(file.read_sample_at(int(self.index.offsets[position]), int(self.index.keys[position]))[1])
            return True
        except Exception:  # any failure to read or decode marks the record as bad
            return False

    def close(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def __del__(self) -> None:
        self.close()
