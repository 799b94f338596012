"""Shard sets (tools/pack_rec.py's output, a list of .rec files) read as one data set by both loaders:
exact keys, labels and bytes, one global image order, the per-rank split and epoch shuffle of
largefr/data/sharding.py, a scan cached per shard, and mxnet's own reader where it is installed."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data import build_loader, prepare_image_index
from largefr.data.pack_shards import PackSettings, pack_shards
from largefr.data.rec_set import resolve_rec_set
from largefr.data.recordio import RecordFile, RecordIOError, unpack_header, write_insightface_rec
from largefr.data.sharding import shard_range
from largefr.data.torch_loader import decode_rgb, normalize_image

IDENTITIES, PER_IDENTITY, SIDE, SHARD_IMAGES = 9, 4, 32, 7  # 36 images in shards of 7, 7, 7, 7, 7, 1
needs_dali = pytest.mark.skipif(not __import__("importlib").util.find_spec("nvidia.dali"), reason="DALI not installed")
KINDS = ["torch", pytest.param("dali", marks=needs_dali)]


def _jpeg(seed: int) -> bytes:
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[str, list[tuple[int, bytes]]]:
    """(shard folder, (label, original JPEG bytes) of every image in sorted folder/file order)."""
    root = tmp_path_factory.mktemp("shards")
    expected = []
    for label in range(IDENTITIES):
        folder = root / "images" / f"person_{label:02d}"
        os.makedirs(folder)
        for i in range(PER_IDENTITY):
            data = _jpeg(100 * label + i)
            (folder / f"{i}.jpg").write_bytes(data)
            expected.append((label, data))
    pack_shards(str(root / "images"), str(root / "set"), settings=PackSettings(shard_images=SHARD_IMAGES),
                workers=2, progress=None)
    return str(root / "set"), expected


def _key_of(expected: list[tuple[int, bytes]]) -> dict[bytes, int]:
    return {normalize_image(decode_rgb(data), False).numpy().tobytes(): key for key, (_, data) in enumerate(expected)}


def test_shards_read_back_exactly(packed):
    folder, expected = packed
    index = prepare_image_index(folder, num_classes=IDENTITIES)
    assert len(resolve_rec_set(folder).files) == 6 and index.file_starts.tolist() == [0, 7, 14, 21, 28, 35, 36]
    assert index.keys.tolist() == list(range(len(expected)))  # keys global over the shards
    assert index.labels.tolist() == [label for label, _ in expected]
    for position, (label, data) in enumerate(expected):
        path, key, offset = index.record(position)
        flag, stored_label, rec_id, _, image = unpack_header(RecordFile(path).read_at(offset, key))
        assert (flag, stored_label, rec_id, image) == (0, float(label), position, data)


def _batches(kind: str, rec, world_size: int, rank: int, epoch: int = 0, **options) -> list:
    loader = build_loader(kind, rec=rec, batch_size=3, rank=rank, world_size=world_size, num_classes=IDENTITIES,
                          image_size=SIDE, random_flip=False, num_workers=1, device="cpu", **options)
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_loaders_read_the_global_order_split_per_rank(packed, kind, world_size):
    folder, expected = packed
    key_of = _key_of(expected)
    for epoch in (0, 1):
        for rank in range(world_size):
            batches = _batches(kind, folder, world_size, rank, epoch, shuffle=False)
            keys = [key_of[image.numpy().tobytes()] for images, _ in batches for image in images]
            labels = [label for _, labels in batches for label in labels.tolist()]
            start, end = shard_range(len(expected), world_size, (rank + epoch) % world_size)
            assert keys == list(range(start, start + len(keys))) and start + len(keys) <= end
            assert len(keys) == (len(expected) // world_size) // 3 * 3  # drop_last: the smallest shard decides
            assert labels == [expected[k][0] for k in keys]


@needs_dali
def test_dali_equals_torch_on_a_shard_set(packed):
    folder, _ = packed
    for world_size in (1, 2):
        for rank in range(world_size):
            dali = _batches("dali", folder, world_size, rank, shuffle=False)
            fallback = _batches("torch", folder, world_size, rank, shuffle=False)
            assert len(dali) == len(fallback) > 0
            for (dali_images, dali_labels), (images, labels) in zip(dali, fallback):
                assert torch.equal(dali_labels, labels) and torch.equal(dali_images, images)


@pytest.mark.parametrize("kind", KINDS)
def test_shuffled_epochs_stay_inside_each_ranks_part(packed, kind):
    folder, expected = packed
    key_of = _key_of(expected)
    seen = []
    for rank in range(2):
        batches = _batches(kind, folder, 2, rank, shuffle=True, seed=5)
        keys = [key_of[image.numpy().tobytes()] for images, _ in batches for image in images]
        start, end = shard_range(len(expected), 2, rank)
        assert len(set(keys)) == len(keys) == 18 and all(start <= k < end for k in keys)
        assert keys != sorted(keys)
        seen += keys
    assert len(set(seen)) == 36


def test_a_list_of_sets_is_one_set_in_list_order(packed, tmp_path):
    folder, expected = packed
    extra = [(label, _jpeg(1000 + label)) for label in range(IDENTITIES)]
    write_insightface_rec(str(tmp_path / "single"), extra, num_classes=IDENTITIES, image_size=(SIDE, SIDE))
    rec = [str(tmp_path / "single"), os.path.join(folder, "train-00001.rec"), folder]
    with pytest.raises(RecordIOError, match=r"train-00001.rec: named twice in data.rec"):
        prepare_image_index(rec)
    rec = [str(tmp_path / "single"), os.path.join(folder, "train-00004.rec"), os.path.join(folder, "train-00005.rec")]
    index = prepare_image_index(rec, num_classes=IDENTITIES)
    assert index.labels.tolist() == list(range(IDENTITIES)) + [label for label, _ in expected[28:]]
    assert index.keys.tolist() == list(range(1, IDENTITIES + 1)) + list(range(28, 36))  # insightface's from 1
    batches = _batches("torch", rec, 1, 0, shuffle=False)
    assert [label for _, labels in batches for label in labels.tolist()] == index.labels[:15].tolist()
    if needs_dali.args[0]:
        return
    dali = _batches("dali", rec, 1, 0, shuffle=False)  # identity records between the files' images: skipped
    assert len(dali) == len(batches) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                             for a, b in zip(dali, batches))


def test_one_changed_shard_is_scanned_again_alone(packed, tmp_path):
    folder, _ = packed
    cache = str(tmp_path / "cache")
    before = prepare_image_index(folder, cache_dir=cache, workers=2)
    scans = {name: os.stat(os.path.join(root, name)).st_mtime_ns
             for root, _, names in os.walk(cache) for name in names if name.endswith(".npz")}
    assert len(scans) == 6
    os.utime(os.path.join(folder, "train-00002.idx"), ns=(1, 1))
    after = prepare_image_index(folder, cache_dir=cache, workers=1)
    now = {name: os.stat(os.path.join(root, name)).st_mtime_ns
           for root, _, names in os.walk(cache) for name in names if name.endswith(".npz")}
    assert len(now) == 6 and len(set(now) - set(scans)) == 1 and next(iter(set(now) - set(scans))).startswith(
        "train-00002.image-index-")
    assert all(now[name] == scans[name] for name in now if name in scans)  # the others were not rewritten
    for column in ("keys", "offsets", "labels", "file_starts"):
        assert np.array_equal(getattr(before, column), getattr(after, column))


def test_an_incomplete_or_inconsistent_shard_set_is_refused(packed, tmp_path):
    folder, _ = packed
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for name in os.listdir(folder):
        if name.startswith("train-") and name.endswith((".rec", ".idx")) or name in ("manifest.json", "property"):
            (copy / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    os.remove(copy / "train-00003.rec")
    with pytest.raises(RecordIOError, match=r"manifest.json: lists 6 shards but .* holds 5 .*train-00003.rec"):
        prepare_image_index(str(copy))
    manifest = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(manifest.replace('"complete": true', '"complete": false'))
    with pytest.raises(RecordIOError, match=r"the pack is incomplete .* run tools/pack_rec.py again"):
        prepare_image_index(str(copy))


def test_mxnet_reads_every_shard(packed):
    recordio = pytest.importorskip("mxnet.recordio")  # not installed on the development machine
    folder, expected = packed
    key = 0
    for file in resolve_rec_set(folder).files:
        reader = recordio.MXIndexedRecordIO(file.idx, file.rec, "r")
        for k in sorted(reader.keys):
            header, image = recordio.unpack(reader.read_idx(k))
            assert (k, header.label, image) == (key, float(expected[key][0]), expected[key][1])
            key += 1
    assert key == len(expected)


def test_data_rec_takes_a_path_or_a_list_of_paths():
    from largefr.config import Config
    from largefr.config_validation import ConfigError

    for rec in ("/data/set", ["/data/a", "/data/b/train-00003.rec"]):
        assert Config.from_dict({"data": {"rec": rec}, "output": "out"}).data.rec == rec
    for rec, problem in ((3, r"data.rec: must be a string or a list of strings or null, got 3"),
                         ([], r"data.rec: must name at least one folder or .rec file"),
                         (["/data/a", " "], r"data.rec: must not be empty")):
        with pytest.raises(ConfigError, match=problem):
            Config.from_dict({"data": {"rec": rec}, "output": "out"})
