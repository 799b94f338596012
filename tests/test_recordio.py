"""MXNet RecordIO in insightface's layout: round trip, framing, and bad input naming file and key."""
from __future__ import annotations

import os
import random
import struct

import pytest

from largefr.data.image_index import prepare_image_index
from largefr.data.recordio import (RECORDIO_MAGIC, IndexedRecordReader, RecordIOError, encode_record, pack_header,
                                   read_index, read_property, unpack_header, write_insightface_rec)
from largefr.data.scan import scan_file

NUM_CLASSES = 5


def _fake_jpeg(label: int, i: int) -> bytes:
    """Bytes that start like a JPEG and differ per sample (the framing does not decode them)."""
    return b"\xff\xd8\xff\xe0" + f"label={label} i={i} ".encode() * (1 + i % 7)


@pytest.fixture
def samples() -> list[tuple[int, bytes]]:
    rng = random.Random(1)
    labels = [c for c in range(NUM_CLASSES) for _ in range(3 + c)]
    rng.shuffle(labels)  # the writer must sort by label
    return [(label, _fake_jpeg(label, i)) for i, label in enumerate(labels)]


@pytest.fixture
def rec_dir(tmp_path, samples) -> str:
    write_insightface_rec(str(tmp_path), samples, num_classes=NUM_CLASSES)
    return str(tmp_path)


def _reader(folder: str) -> IndexedRecordReader:
    return IndexedRecordReader(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx"))


def test_round_trip_insightface_layout(rec_dir, samples):
    reader = _reader(rec_dir)
    n = len(samples)
    flag, label, *_ = unpack_header(reader.read(0))
    assert flag == 2 and label == (n + 1.0, n + 1.0 + NUM_CLASSES)
    assert reader.image_keys() == list(range(1, n + 1))
    assert reader.keys == list(range(0, n + 1 + NUM_CLASSES))
    read_back = [reader.read_sample(k) for k in reader.image_keys()]
    assert [label for label, _ in read_back] == sorted(label for label, _ in samples)  # sorted by identity
    assert sorted((int(lb), data) for lb, data in read_back) == sorted(samples)
    for class_id in range(NUM_CLASSES):  # identity records give each class's image range
        flag, (first, end), rec_id, _, body = unpack_header(reader.read(n + 1 + class_id))
        assert flag == 2 and body == b"" and rec_id == n + 1 + class_id
        assert {int(reader.read_sample(k)[0]) for k in range(int(first), int(end))} == {class_id}
        assert end - first == sum(1 for lb, _ in samples if lb == class_id)
    assert read_property(rec_dir) == (NUM_CLASSES, 112, 112)
    assert not [f for f in os.listdir(rec_dir) if "tmp" in f]


def test_idx_is_key_tab_offset_text(rec_dir):
    with open(os.path.join(rec_dir, "train.idx")) as f:
        first = f.readline()
    assert first == "0\t0\n"
    offsets = read_index(os.path.join(rec_dir, "train.idx"))
    with open(os.path.join(rec_dir, "train.rec"), "rb") as f:
        data = f.read()
    for offset in offsets.values():
        assert struct.unpack_from("<I", data, offset)[0] == RECORDIO_MAGIC


def test_shuffled_pack_is_seeded_and_has_no_identity_records(tmp_path, samples):
    orders = []
    for run, seed in enumerate([3, 3, 4]):
        folder = str(tmp_path / f"run{run}")
        write_insightface_rec(folder, samples, num_classes=NUM_CLASSES, shuffle=True, seed=seed)
        reader = _reader(folder)
        assert unpack_header(reader.read(0))[1] == (len(samples) + 1.0,) * 2
        assert reader.keys == list(range(len(samples) + 1))
        orders.append([reader.read_sample(k)[1] for k in reader.image_keys()])
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(data for _, data in samples)


def test_header_pack_unpack():
    assert unpack_header(pack_header(7, b"img", id=3, id2=4)) == (0, 7.0, 3, 4, b"img")
    assert unpack_header(pack_header([1.0, 2.5], b"xy")) == (2, (1.0, 2.5), 0, 0, b"xy")


def test_payload_holding_the_magic_is_split_and_rejoined(tmp_path):
    magic = struct.pack("<I", RECORDIO_MAGIC)
    image = b"\xff\xd8\xff\xe0" + magic + b"1234" + magic + b"tail!"  # the magic at aligned payload offsets
    framed = encode_record(pack_header(0, image))
    cflags = []
    position = 0
    while position < len(framed):  # walk the parts as dmlc-core's reader does
        assert framed[position:position + 4] == magic
        lrec = struct.unpack_from("<I", framed, position + 4)[0]
        cflags.append(lrec >> 29)
        position += 8 + (((lrec & (2**29 - 1)) + 3) & ~3)
    assert cflags == [1, 2, 3]
    write_insightface_rec(str(tmp_path), [(0, image), (0, image[:4] + b"no magic")], num_classes=1)
    assert _reader(str(tmp_path)).read_sample(1) == (0.0, image)
    found = scan_file(str(tmp_path / "train.rec"), str(tmp_path / "train.idx"))  # multi-part frames: read in full
    assert found.keys.tolist() == [1, 2] and found.problems.tolist() == [0, 0] and found.header_layout


def test_writer_refuses_bad_labels_and_leaves_no_output(tmp_path):
    with pytest.raises(ValueError, match=r"sample 1: label 5 is not an integer in \[0, 5\)"):
        write_insightface_rec(str(tmp_path), [(0, b"a"), (5, b"b")], num_classes=5)
    assert os.listdir(tmp_path) == []


# ---- bad input: every error names the file and the key or offset ------------------------------


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_truncated_rec_names_key(rec_dir, samples):
    path_rec = os.path.join(rec_dir, "train.rec")
    last_image = len(samples)
    offset = read_index(os.path.join(rec_dir, "train.idx"))[last_image]
    _truncate(path_rec, offset + 20)  # cut inside the last image record (identity records lost too)
    with pytest.raises(RecordIOError, match=r"past the end of .*train.rec"):
        _reader(rec_dir)  # the identity records' offsets are now past the end
    image_offsets = {k: o for k, o in read_index(os.path.join(rec_dir, "train.idx")).items() if k <= last_image}
    with open(os.path.join(rec_dir, "train.idx"), "w") as f:  # keep only keys that still start in the file
        f.writelines(f"{k}\t{o}\n" for k, o in image_offsets.items())
    reader = _reader(rec_dir)
    with pytest.raises(RecordIOError, match=rf"train.rec key {last_image}: record at offset {offset} .*truncated"):
        reader.read(last_image)
    with pytest.raises(RecordIOError, match=rf"train.rec key {last_image}: .*truncated"):
        prepare_image_index(rec_dir, num_classes=NUM_CLASSES)


def test_idx_offset_past_end_names_key_and_offset(rec_dir):
    with open(os.path.join(rec_dir, "train.idx"), "a") as f:
        f.write("999\t123456789\n")
    with pytest.raises(RecordIOError, match=r"train.idx: key 999 points at offset 123456789, past the end"):
        _reader(rec_dir)


def test_wrong_magic_names_key_and_offset(rec_dir):
    offset = read_index(os.path.join(rec_dir, "train.idx"))[4]
    with open(os.path.join(rec_dir, "train.rec"), "r+b") as f:
        f.seek(offset)
        f.write(b"\0\0\0\0")
    with pytest.raises(RecordIOError, match=rf"train.rec key 4: wrong magic 0x00000000 at offset {offset}"):
        _reader(rec_dir).read(4)
    with pytest.raises(RecordIOError, match=r"train.rec key 4: wrong magic"):
        prepare_image_index(rec_dir, num_classes=NUM_CLASSES)


def test_duplicate_idx_key(rec_dir):
    with open(os.path.join(rec_dir, "train.idx"), "a") as f:
        f.write("3\t0\n")
    with pytest.raises(RecordIOError, match=r"train.idx: duplicate key 3"):
        _reader(rec_dir)


def test_missing_image_key(rec_dir):
    path_idx = os.path.join(rec_dir, "train.idx")
    offsets = read_index(path_idx)
    del offsets[6]
    with open(path_idx, "w") as f:
        f.writelines(f"{k}\t{o}\n" for k, o in offsets.items())
    with pytest.raises(RecordIOError, match=r"train.idx: key 6 is missing"):
        _reader(rec_dir).read(6)
    with pytest.raises(RecordIOError, match=r"train.idx: image key 6 .* is absent"):
        prepare_image_index(rec_dir, num_classes=NUM_CLASSES)


def test_malformed_idx_line(rec_dir):
    with open(os.path.join(rec_dir, "train.idx"), "a") as f:
        f.write("7 eight\n")
    with pytest.raises(RecordIOError, match=r"train.idx: line \d+ is '7 eight'"):
        _reader(rec_dir)


def test_label_out_of_range_names_key(rec_dir):
    with pytest.raises(RecordIOError, match=r"property: says 5 classes but the config has data.num_classes=4"):
        prepare_image_index(rec_dir, num_classes=4)
    os.remove(os.path.join(rec_dir, "property"))  # without property the labels themselves are checked
    first_key_of_class_4 = len(_reader(rec_dir).image_keys()) - 7 + 1  # class 4 has 3 + 4 images, sorted last
    with pytest.raises(RecordIOError, match=rf"train.rec key {first_key_of_class_4}: label 4 is outside \[0, 4\)"):
        prepare_image_index(rec_dir, num_classes=4)


def test_negative_label_names_key(tmp_path):
    # write_insightface_rec refuses negative labels, so build the record by hand
    write_insightface_rec(str(tmp_path), [(0, _fake_jpeg(0, 0)), (0, _fake_jpeg(0, 1))], num_classes=1)
    path_rec = os.path.join(tmp_path, "train.rec")
    offset = read_index(os.path.join(tmp_path, "train.idx"))[2]
    with open(path_rec, "r+b") as f:
        f.seek(offset + 8 + 4)  # frame header, then flag; the label float follows
        f.write(struct.pack("<f", -1.0))
    with pytest.raises(RecordIOError, match=r"train.rec key 2: label -1 is outside \[0, 1\)"):
        prepare_image_index(str(tmp_path), num_classes=1)


def test_property_errors(tmp_path):
    with pytest.raises(RecordIOError, match=r"property: missing"):
        read_property(str(tmp_path))
    (tmp_path / "property").write_text("85742;112;112")
    with pytest.raises(RecordIOError, match=r"property: holds '85742;112;112'"):
        read_property(str(tmp_path))


def test_bad_continuation_flag_names_key(rec_dir):
    offset = read_index(os.path.join(rec_dir, "train.idx"))[2]
    with open(os.path.join(rec_dir, "train.rec"), "r+b") as f:
        f.seek(offset + 4)
        lrec = struct.unpack("<I", f.read(4))[0]
        f.seek(offset + 4)
        f.write(struct.pack("<I", lrec | (2 << 29)))  # a "middle part" where a record must start
    with pytest.raises(RecordIOError, match=rf"train.rec key 2: continuation flag 2 at offset {offset}"):
        _reader(rec_dir).read(2)


def test_index_lines_in_any_order_scan_to_file_order(rec_dir):
    path_idx = os.path.join(rec_dir, "train.idx")
    before = scan_file(os.path.join(rec_dir, "train.rec"), path_idx)
    lines = open(path_idx).read().splitlines()
    with open(path_idx, "w") as f:  # another writer's order, with a blank line: the same records, in file order
        f.write("\n".join(lines[::-1][:3] + [""] + lines[::-1][3:]) + "\n")
    after = scan_file(os.path.join(rec_dir, "train.rec"), path_idx)
    for column in ("keys", "offsets", "labels", "problems"):
        assert getattr(after, column).tolist() == getattr(before, column).tolist()
    assert after.offsets.tolist() == sorted(after.offsets.tolist()) and after.header_layout
