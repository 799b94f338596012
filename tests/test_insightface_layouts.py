"""Every data layout insightface users have, written here byte by byte from the MXNet RecordIO format
(not with largefr's writer), read with counts taken from the data, and trained a few steps on.

Format written below: a record is `uint32 0xced7230a`, `uint32 length` (continuation flag 0), the
payload, zero padding to 4 bytes; a payload is struct 'IfQQ' (flag, label, id, id2), `flag` float32
labels when flag > 0, then the image bytes; train.idx lines are `key\\toffset`.
"""
from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data import prepare_image_index
from largefr.data.image_index import counts_from_data
from largefr.data.pack_shards import PackSettings, pack_shards
from largefr.data.recordio import IndexedRecordReader, RecordIOError, read_property_file
from tests.distributed_helpers import run_distributed

IDENTITIES, PER_IDENTITY, SIDE = 6, 4, 32
LAYOUTS = ("faces_emore", "rec_builder", "label_vectors", "im2rec")


def _jpeg(seed: int) -> bytes:
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _payload(flag: int, label: float, rec_id: int, labels: tuple[float, ...] = (), image: bytes = b"") -> bytes:
    assert flag == len(labels)
    return struct.pack("IfQQ", flag, label, rec_id, 0) + struct.pack(f"{len(labels)}f", *labels) + image


def _frame(payload: bytes) -> bytes:
    # a payload holding the magic at a 4-aligned position would be split by dmlc's writer; none here
    assert all(payload[i:i + 4] != struct.pack("I", 0xCED7230A) for i in range(0, len(payload) - 3, 4))
    return struct.pack("II", 0xCED7230A, len(payload)) + payload + b"\0" * (-len(payload) % 4)


def _write(folder, records: list[tuple[int, bytes]], property_lines: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    offset, lines = 0, []
    with open(os.path.join(folder, "train.rec"), "wb") as rec:
        for key, payload in records:
            framed = _frame(payload)
            rec.write(framed)
            lines.append(f"{key}\t{offset}\n")
            offset += len(framed)
    with open(os.path.join(folder, "train.idx"), "w") as idx:
        idx.writelines(lines)
    with open(os.path.join(folder, "property"), "w") as prop:
        prop.write("".join(line + "\n" for line in property_lines))


def _labels() -> list[int]:
    return [label for label in range(IDENTITIES) for _ in range(PER_IDENTITY)]


def write_faces_emore(folder) -> None:
    """Header record 0 [first identity key, end key], images 1..N, one [start, end) record per identity."""
    labels, n = _labels(), IDENTITIES * PER_IDENTITY
    records = [(0, _payload(2, 0.0, 0, (float(n + 1), float(n + 1 + IDENTITIES))))]
    records += [(key, _payload(0, float(label), key, image=_jpeg(key))) for key, label in enumerate(labels, 1)]
    records += [(n + 1 + c, _payload(2, 0.0, n + 1 + c, (float(1 + c * PER_IDENTITY), float(1 + (c + 1) * PER_IDENTITY))))
                for c in range(IDENTITIES)]
    _write(folder, records, [f"{IDENTITIES},{SIDE},{SIDE}"])


def write_rec_builder(folder, *, label_vectors: bool = False) -> None:
    """RecBuilder: image keys from 0, no header, property with a second line (#images), train.meta."""
    labels = _labels()
    records, meta = [], []
    for key, label in enumerate(labels):
        if label_vectors:  # add_image(img, [class, other]): flag 2, label field 0
            payload = _payload(2, 0.0, key, (float(label), 7.0), image=_jpeg(key))
        else:
            payload = _payload(0, float(label), key, image=_jpeg(key))
        records.append((key, payload))
        meta.append({"image_index": key, "image_classes": [label]})
    _write(folder, records, [f"{IDENTITIES},{SIDE},{SIDE}", str(len(labels))])
    with open(os.path.join(folder, "train.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=pickle.HIGHEST_PROTOCOL)


def write_im2rec(folder) -> None:
    """im2rec: records in its (shuffled) .lst order, key = the .lst index (so key 0 is an image somewhere in
    the file, flag 0), one scalar label each, no header, no identity records, no property file."""
    labels = _labels()
    order = np.random.default_rng(11).permutation(len(labels))
    records = [(int(i), _payload(0, float(labels[i]), int(i), image=_jpeg(int(i)))) for i in order]
    _write(folder, records, [])
    os.remove(os.path.join(folder, "property"))


def write_image_folder(root) -> None:
    for label in range(IDENTITIES):
        os.makedirs(root / f"person_{label:02d}")
        for i in range(PER_IDENTITY):
            (root / f"person_{label:02d}" / f"{i}.jpg").write_bytes(_jpeg(100 * label + i))


def write_layout(layout: str, folder) -> None:
    if layout == "faces_emore":
        write_faces_emore(folder)
    elif layout == "im2rec":
        write_im2rec(folder)
    else:
        write_rec_builder(folder, label_vectors=layout == "label_vectors")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("layouts")
    for layout in LAYOUTS:
        write_layout(layout, root / layout)
    write_image_folder(root / "images")
    pack_shards(str(root / "images"), str(root / "shards"), settings=PackSettings(shard_images=7), progress=None)
    return {**{layout: str(root / layout) for layout in LAYOUTS}, "images": str(root / "images"),
            "shards": str(root / "shards")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_scans_to_the_images_with_their_classes(layouts, layout):
    folder = layouts[layout]
    index = prepare_image_index(folder)
    assert len(index) == IDENTITIES * PER_IDENTITY
    assert sorted(index.labels.tolist()) == _labels()
    assert counts_from_data(folder, index) == (IDENTITIES, IDENTITIES * PER_IDENTITY)
    with IndexedRecordReader(os.path.join(folder, "train.rec")) as reader:
        first = 1 if layout == "faces_emore" else 0
        assert reader.image_keys() == list(range(first, first + IDENTITIES * PER_IDENTITY))
        label, image = reader.read_sample(first + 5)
        assert label == 1.0 and image[:3] == b"\xff\xd8\xff"


def test_property_second_line_is_the_image_count(layouts):
    assert read_property_file(layouts["rec_builder"]) == (IDENTITIES, SIDE, SIDE, IDENTITIES * PER_IDENTITY)
    assert read_property_file(layouts["faces_emore"]) == (IDENTITIES, SIDE, SIDE, None)


def test_given_counts_that_differ_from_the_data_say_which_is_right(layouts):
    folder = layouts["rec_builder"]
    index = prepare_image_index(folder)
    with pytest.raises(RecordIOError, match=r"property: says 6 classes but the config has data.num_classes=7; "
                                            r"set data.num_classes=6, or data.num_classes=null to read it"):
        counts_from_data(folder, index, num_classes=7)
    with pytest.raises(RecordIOError, match=r"holds 24 usable images but the config has data.num_images=30; "
                                            r"set data.num_images=24"):
        counts_from_data(folder, index, num_images=30)
    assert counts_from_data(folder, index, num_classes=6, num_images=24) == (6, 24)


def test_without_a_property_file_the_classes_are_the_largest_label_plus_one(tmp_path):
    folder = tmp_path / "noprop"
    write_rec_builder(folder)
    os.remove(folder / "property")
    assert counts_from_data(str(folder), prepare_image_index(str(folder))) == (IDENTITIES, IDENTITIES * PER_IDENTITY)


def test_image_folder_is_packed_once_and_again_when_it_changes(layouts, tmp_path):
    from largefr.data.pack import ensure_packed

    root = tmp_path / "faces"
    write_image_folder(root)
    packed = ensure_packed(str(root), str(tmp_path / "cache"), progress=None, workers=1)
    first_mtime = os.stat(os.path.join(packed, "train-00000.rec")).st_mtime_ns
    assert ensure_packed(str(root), str(tmp_path / "cache"), progress=None) == packed
    assert os.stat(os.path.join(packed, "train-00000.rec")).st_mtime_ns == first_mtime  # reused
    (root / "person_00" / "extra.jpg").write_bytes(_jpeg(999))
    ensure_packed(str(root), str(tmp_path / "cache"), progress=None)
    index = prepare_image_index(packed)
    assert len(index) == IDENTITIES * PER_IDENTITY + 1 and int((index.labels == 0).sum()) == PER_IDENTITY + 1


def _config(output: str, **data) -> dict:
    return {
        "data": {"loader": "torch", "image_size": SIDE, "num_workers": 0, **data},
        "model": {"network": "mbf", "embedding_size": 8},
        "head": {"scale": 16.0, "margin": 0.3},
        "cluster": {"queue_size": 32, "num_sampled_centers": 4},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"type": "step", "epochs": 4},
        "train": {"batch_size": 4, "precision": "fp32", "zero_stage": 1, "seed": 3, "max_steps": 2},
        "checkpoint": {"every": 0, "keep_last": 1},
        "logging": {"every": 1, "tensorboard": False},
        "output": output,
    }


def _train_each(rank: int, world: int, layouts: dict[str, str], output: str, cache: str) -> dict:
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    results = {}
    for name, folder in layouts.items():
        source = {"images": folder, "cache_dir": cache} if name == "images" else {"rec": folder}
        config = _config(f"{output}/{name}", **source)
        config["train"]["freeze_backbone_steps"] = 2 if name == "images" else 0  # the image folder run: frozen
        trainer = build_trainer(Config.from_dict(config, world_size=world), env)
        trainer.loss_history = []
        before = [p.detach().clone() for p in trainer.runner.engine.module.parameters()]
        head_before = trainer.runner.head.margin_head.weight.detach().clone()
        summary = trainer.train()
        trainer.metrics.close()
        after = list(trainer.runner.engine.module.parameters())
        results[name] = {"losses": [float(x) for x in trainer.loss_history], "summary": summary,
                         "backbone_moved": any(not torch.equal(a, b) for a, b in zip(before, after)),
                         "head_moved": not torch.equal(head_before, trainer.runner.head.margin_head.weight)}
    return results


def test_every_layout_and_an_image_folder_train_with_counts_from_the_data(layouts, tmp_path):
    per_rank = run_distributed(_train_each, 2, layouts, str(tmp_path / "out"), str(tmp_path / "cache"))
    for name in (*LAYOUTS, "images", "shards"):
        result = per_rank[0][name]
        assert result["summary"]["steps"] == 2, name
        assert result["summary"]["num_classes"] == IDENTITIES, name
        assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"])), name
        assert result["losses"] == pytest.approx(per_rank[1][name]["losses"], rel=1e-6)
        assert result["head_moved"]
        assert result["backbone_moved"] == (name != "images"), name  # train.freeze_backbone_steps=2 there
    packed = [name for name in os.listdir(tmp_path / "cache") if name.startswith("images-")]
    assert len(packed) == 1 and os.path.isfile(tmp_path / "cache" / packed[0] / "manifest.json")
