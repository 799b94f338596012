"""Loaders: DALI (CPU) == torch fallback, sharding, identity mixing, resume, bad images, synthetic."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import struct
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data import build_loader, prepare_image_index
from largefr.data.recordio import (BadImageError, IndexedRecordReader, RecordIOError, encode_record, pack_header,
                                   write_insightface_rec)
from largefr.data.torch_loader import decode_rgb

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia") is None
                                or importlib.util.find_spec("nvidia.dali") is None,
                                reason='DALI not installed (pip install "largefr[dali]")')
KINDS = [pytest.param("dali", marks=needs_dali), "torch"]

NUM_IDS, PER_ID = 10, 5  # 50 images: shards of 25 (world 2) and 16/17/17 (world 3)


def _encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def _face_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random image (JPEG-friendly, unique per call)."""
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def sorted_rec(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("sorted_rec"))
    rng = np.random.default_rng(0)
    samples = [(c, _encode(_face_like(rng, 112))) for c in range(NUM_IDS) for _ in range(PER_ID)]
    write_insightface_rec(folder, samples, num_classes=NUM_IDS)
    return folder


def _key_of_pixels(folder: str) -> dict[str, int]:
    """sha1 of decoded uint8 pixels -> record key, to recover which record a batch row came from."""
    reader = IndexedRecordReader(os.path.join(folder, "train.rec"))
    return {hashlib.sha1(decode_rgb(reader.read_sample(k)[1]).tobytes()).hexdigest(): k for k in reader.image_keys()}


def _keys_of_batch(images: torch.Tensor, key_of: dict[str, int]) -> list[int]:
    pixels = torch.round(images * 127.5 + 127.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return [key_of[hashlib.sha1(p.tobytes()).hexdigest()] for p in pixels]


def _loader(kind: str, folder: str, **overrides):
    options = dict(rec=folder, batch_size=4, rank=0, world_size=1, num_classes=NUM_IDS, num_workers=1,
                   shuffle=False, random_flip=False, device="cpu" if kind != "torch" else None)
    options.update(overrides)
    if options["device"] is None:
        del options["device"]
    return build_loader(kind, **options)


@needs_dali
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_dali_cpu_equals_torch_fallback(sorted_rec, world_size):
    for rank in range(world_size):
        dali = _loader("dali", sorted_rec, rank=rank, world_size=world_size)
        fallback = _loader("torch", sorted_rec, rank=rank, world_size=world_size)
        assert len(dali) == len(fallback) == (NUM_IDS * PER_ID // world_size) // 4
        for epoch in (0, 1):  # the shard rotates with the epoch in both
            dali.set_epoch(epoch)
            fallback.set_epoch(epoch)
            pairs = list(zip(dali, fallback, strict=True))
            assert len(pairs) == len(dali)
            for (dali_images, dali_labels), (images, labels) in pairs:
                assert dali_labels.dtype == labels.dtype == torch.int64
                assert torch.equal(dali_labels, labels)
                assert dali_images.dtype == torch.float32 and dali_images.shape == (4, 3, 112, 112)
                assert torch.equal(dali_images, images)  # bit-identical pixels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_and_cover_every_key(sorted_rec, kind, world_size):
    key_of = _key_of_pixels(sorted_rec)
    per_rank = []
    for rank in range(world_size):
        loader = _loader(kind, sorted_rec, rank=rank, world_size=world_size, drop_last=False)
        batches = list(loader)
        assert len(batches) == len(loader)  # equal on every rank, even with an empty last batch
        per_rank.append([k for images, _ in batches for k in _keys_of_batch(images, key_of)])
    all_keys = [k for keys in per_rank for k in keys]
    assert len(all_keys) == len(set(all_keys)) == NUM_IDS * PER_ID
    assert set(all_keys) == set(key_of.values())


@pytest.mark.parametrize("kind", KINDS)
def test_shuffled_shards_stay_disjoint(sorted_rec, kind):
    key_of = _key_of_pixels(sorted_rec)
    per_rank = [set(), set(), set()]
    for rank in range(3):
        loader = _loader(kind, sorted_rec, rank=rank, world_size=3, shuffle=True, seed=5)
        per_rank[rank] = {k for images, _ in loader for k in _keys_of_batch(images, key_of)}
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[1] & per_rank[2]) and not (per_rank[0] & per_rank[2])


@pytest.fixture(scope="module")
def many_identities_rec(tmp_path_factory) -> str:
    """200 identities x 5 images, 16x16 PNG (cheap to decode), sorted by identity."""
    folder = str(tmp_path_factory.mktemp("many_ids"))
    rng = np.random.default_rng(1)
    samples = [(c, _encode(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "PNG"))
               for c in range(200) for _ in range(5)]
    write_insightface_rec(folder, samples, num_classes=200, image_size=(16, 16))
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_batches_from_identity_sorted_rec_mix_identities(many_identities_rec, kind):
    batch = 16
    common = dict(rec=many_identities_rec, batch_size=batch, num_classes=200, image_size=16, world_size=2,
                  num_workers=1, random_flip=False, shuffle_buffer=1)  # initial_fill from the 8*B*P rule
    if kind == "dali":
        common["device"] = "cpu"
    for rank in range(2):
        loader = build_loader(kind, rank=rank, seed=rank, **common)
        distinct = [len(set(labels.tolist())) for _, labels in loader]
        assert len(distinct) == len(loader) == 500 // batch
        assert min(distinct) >= 0.8 * batch, distinct
    unshuffled = build_loader(kind, rank=0, shuffle=False, **common)
    assert max(len(set(labels.tolist())) for _, labels in unshuffled) <= batch // 5 + 1  # the sorted order


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_epochs_resume_and_flip(sorted_rec, kind):
    def run(loader, epoch, skip=0):
        loader.set_epoch(epoch)
        return [(images.clone(), labels.clone()) for images, labels in loader.iter_from(skip)]

    options = dict(shuffle=True, random_flip=True, seed=3)
    first, again = _loader(kind, sorted_rec, **options), _loader(kind, sorted_rec, **options)
    epoch0, epoch1 = run(first, 0), run(first, 1)
    assert len(epoch0) == len(first) == 12
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(epoch0, epoch1))  # epochs differ
    resumed = run(again, 1, skip=5)  # a fresh loader resumed at batch 5 of epoch 1
    assert len(resumed) == len(epoch1) - 5
    for (images, labels), (ref_images, ref_labels) in zip(resumed, epoch1[5:]):
        assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)
    key_of = _key_of_pixels(sorted_rec)
    flipped = 0
    for images, _ in epoch0:
        for image in images:
            if _is_known(image, key_of):
                continue
            assert _is_known(image.flip(-1), key_of)  # not a known image: must be a mirrored one
            flipped += 1
    assert 0.25 * 48 < flipped < 0.75 * 48


def _is_known(image: torch.Tensor, key_of: dict[str, int]) -> bool:
    pixels = torch.round(image * 127.5 + 127.5).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return hashlib.sha1(pixels.tobytes()).hexdigest() in key_of


# ---- insightface specifics ---------------------------------------------------------------------


@needs_dali
def test_dali_needs_the_filtered_index(sorted_rec):
    """DALI's reader counts header and identity records as samples (DALI issue 2806)."""
    from largefr.data.dali_loader import build_pipeline

    index = prepare_image_index(sorted_rec, num_classes=NUM_IDS)
    sizes = {}
    for name, index_path in [("raw", os.path.join(sorted_rec, "train.idx")), ("filtered", index.dali_index())]:
        pipe = build_pipeline(rec_paths=index.rec_paths, index_path=index_path, batch_size=2, num_threads=1,
                              device_id=None, seed=0, shard_id=0, num_shards=1, shuffle=False, initial_fill=1,
                              random_flip=False, pad_last_batch=False)
        sizes[name] = pipe.epoch_size("reader")
        del pipe
    assert sizes == {"raw": 1 + NUM_IDS * PER_ID + NUM_IDS, "filtered": NUM_IDS * PER_ID}
    assert os.path.dirname(index.dali_index_path) == sorted_rec  # cached next to the data
    with open(index.dali_index_path) as f:
        assert [int(line.split()[0]) for line in f] == list(range(1, NUM_IDS * PER_ID + 1))


def test_index_cache_follows_the_idx_and_cache_dir(tmp_path):
    rng = np.random.default_rng(2)
    write_insightface_rec(str(tmp_path / "data"), [(0, _encode(_face_like(rng, 112))) for _ in range(4)],
                          num_classes=1)
    first = prepare_image_index(str(tmp_path / "data"), num_classes=1)
    os.utime(tmp_path / "data" / "train.idx", ns=(1, 1))  # a re-written index is scanned again
    second = prepare_image_index(str(tmp_path / "data"), num_classes=1)
    assert first.dali_index_path != second.dali_index_path and os.path.exists(second.dali_index())
    elsewhere = prepare_image_index(str(tmp_path / "data"), num_classes=1, cache_dir=str(tmp_path / "cache"))
    assert elsewhere.dali_index_path.startswith(str(tmp_path / "cache"))


def _prepare_recording_scans(folder: str, scans_log: str, start) -> None:
    import largefr.data.image_index as image_index

    original = image_index.scan_missing

    def recording_scan(*args, **kwargs):
        with open(scans_log, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # both ranks are surely waiting for the cache by now
        return original(*args, **kwargs)

    image_index.scan_missing = recording_scan
    start.wait()
    prepare_image_index(folder, num_classes=1)


def test_ranks_starting_together_scan_once(tmp_path):
    import multiprocessing

    rng = np.random.default_rng(2)
    write_insightface_rec(str(tmp_path / "data"), [(0, _encode(_face_like(rng, 112))) for _ in range(4)],
                          num_classes=1)
    context = multiprocessing.get_context("fork")
    start = context.Event()
    ranks = [context.Process(target=_prepare_recording_scans,
                             args=(str(tmp_path / "data"), str(tmp_path / "scans.log"), start)) for _ in range(2)]
    for rank in ranks:
        rank.start()
    start.set()
    for rank in ranks:
        rank.join(60)
    assert [rank.exitcode for rank in ranks] == [0, 0]
    assert len((tmp_path / "scans.log").read_text().split()) == 1


def test_rec_changed_in_place_is_scanned_again(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "data"
    write_insightface_rec(str(folder), [(0, _encode(_face_like(rng, 112))) for _ in range(4)], num_classes=1)
    os.utime(folder / "train.rec", ns=(1, 1))  # written long ago: the rewrite below gets a new mtime for sure
    prepare_image_index(str(folder), num_classes=1)
    offset = int((folder / "train.idx").read_text().splitlines()[2].split()[1])  # key 2
    with open(folder / "train.rec", "r+b") as rec:  # same size, new label: only the mtime tells
        rec.seek(offset + 8 + 4)
        rec.write(struct.pack("<f", 5.0))
    with pytest.raises(RecordIOError, match=r"train.rec key 2: label 5 is outside \[0, 1\)"):
        prepare_image_index(str(folder), num_classes=1)


@needs_dali
def test_label_vectors_use_the_first_label(tmp_path):
    """Some insightface packs store image labels as float vectors (flag > 0): class = label[0]."""
    rng = np.random.default_rng(3)
    records = [pack_header([3.0, 6.0])] + [pack_header([float(c), 0.5], _encode(_face_like(rng, 112)), id=k)
                                             for k, c in enumerate([0, 0, 1, 1, 2], 1)]
    offsets, data = [], b""
    for payload in records:
        offsets.append(len(data))
        data += encode_record(payload)
    (tmp_path / "train.rec").write_bytes(data)
    (tmp_path / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    (tmp_path / "property").write_text("3,112,112\n")
    options = dict(batch_size=2, num_classes=3)
    dali = [labels.tolist() for _, labels in _loader("dali", str(tmp_path), **options)]
    fallback = [labels.tolist() for _, labels in _loader("torch", str(tmp_path), **options)]
    assert dali == fallback == [[0, 0]]  # keys 1, 2 only: record 0 says images are keys 1..2


# ---- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def rec_with_bad_image(tmp_path) -> tuple[str, int]:
    """12 images; key 7 starts like a JPEG but cannot be decoded."""
    rng = np.random.default_rng(4)
    samples = [(i // 4, _encode(_face_like(rng, 112))) for i in range(12)]
    samples[6] = (1, b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    write_insightface_rec(str(tmp_path), samples, num_classes=3)
    return str(tmp_path), 7


def test_fallback_names_undecodable_key_or_skips_it(rec_with_bad_image):
    folder, bad_key = rec_with_bad_image
    with pytest.raises(BadImageError, match=rf"train.rec key {bad_key} \(offset \d+\): undecodable image"):
        list(_loader("torch", folder, num_classes=3, num_workers=0))
    with pytest.raises(BadImageError, match=rf"train.rec key {bad_key} .*undecodable"):  # through a worker
        list(_loader("torch", folder, num_classes=3, num_workers=1))
    loader = _loader("torch", folder, num_classes=3, on_bad_image="skip", num_workers=0)
    batches = list(loader)
    assert len(batches) == 3 and all(images.shape[0] == 4 for images, _ in batches)
    assert loader.skipped_images == 1


@needs_dali
def test_dali_names_undecodable_key_or_skips_it(rec_with_bad_image):
    folder, bad_key = rec_with_bad_image
    with pytest.raises(BadImageError, match=rf"train.rec: undecodable image at key {bad_key} \(offset \d+\)"):
        list(_loader("dali", folder, num_classes=3))
    loader = _loader("dali", folder, num_classes=3, on_bad_image="skip")
    labels = [labels.tolist() for _, labels in loader]
    assert len(labels) == 3 and loader.skipped_images == 1
    assert labels == [[0, 0, 0, 0], [1, 1, 1, 2], [2, 2, 2, 0]]  # key 7 left out, the shard wraps around
    assert labels == [lb.tolist() for _, lb in loader]  # the next epoch knows the bad key already


def test_record_that_is_not_an_image(tmp_path):
    rng = np.random.default_rng(5)
    samples = [(0, _encode(_face_like(rng, 112))) for _ in range(5)]
    samples[2] = (0, b"this is text, not an image")
    write_insightface_rec(str(tmp_path), samples, num_classes=1)
    with pytest.raises(BadImageError, match=r"train.rec key 3 \(offset \d+\): the record does not hold an encoded"):
        build_loader("torch", rec=str(tmp_path), batch_size=2, rank=0, world_size=1, num_classes=1)
    loader = build_loader("torch", rec=str(tmp_path), batch_size=2, rank=0, world_size=1, num_classes=1,
                          on_bad_image="skip", num_workers=0)
    assert len(loader) == 2 and loader.index.bad_keys == (3,)


def test_labels_and_property_checked_against_config(sorted_rec):
    with pytest.raises(RecordIOError, match=r"property: says 10 classes but the config has data.num_classes=9"):
        _loader("torch", sorted_rec, num_classes=9)
    with pytest.raises(RecordIOError, match=r"property: images are 112x112 but the loader was asked for 96x96"):
        _loader("torch", sorted_rec, image_size=96)


def test_empty_data_set(tmp_path):
    write_insightface_rec(str(tmp_path), [], num_classes=2)
    with pytest.raises(RecordIOError, match=r"train.rec: holds no usable image records"):
        _loader("torch", str(tmp_path), num_classes=2)


def test_shard_smaller_than_a_batch(sorted_rec):
    with pytest.raises(ValueError, match=r"each of 4 ranks a shard of 12, smaller than one batch of 16"):
        _loader("torch", sorted_rec, world_size=4, batch_size=16)


def test_missing_dali_names_the_extra(sorted_rec, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r'pip install "largefr\[dali\]"'):
        _loader("dali", sorted_rec)


def test_unknown_loader_kind():
    with pytest.raises(ValueError, match=r"data.loader='mxnet' is not one of"):
        build_loader("mxnet", rec=None, batch_size=2, rank=0, world_size=1, num_classes=2)


# ---- synthetic -------------------------------------------------------------------------------------


def test_synthetic_loader():
    loader = build_loader("synthetic", rec=None, batch_size=8, rank=1, world_size=2, num_classes=7,
                          num_images=160, seed=2, device="cpu")
    batches = list(loader)
    assert len(batches) == len(loader) == 10
    images, labels = batches[0]
    assert images.shape == (8, 3, 112, 112) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert -1 <= images.min() and images.max() <= 1
    all_labels = torch.cat([lb for _, lb in batches])
    assert 0 <= all_labels.min() and all_labels.max() < 7 and len(set(all_labels.tolist())) == 7
    again = [lb for _, lb in loader.iter_from(4)]
    assert all(torch.equal(a, b) for a, b in zip(again, [lb for _, lb in batches[4:]], strict=True))
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([lb for _, lb in loader]), all_labels)


def test_missing_rec_file_is_named(tmp_path):
    (tmp_path / "train.idx").write_text("0\t0\n")
    with pytest.raises(RecordIOError, match=r"train.rec: no such file \(data.rec must hold"):
        _loader("torch", str(tmp_path))
