"""tools/rec.py: verify names every planted fault (file, key, offset); stats; shuffle and merge keep every
record of insightface's layouts (written byte by byte in tests/test_insightface_layouts.py) and im2rec's."""
from __future__ import annotations

import collections
import json
import os
import struct
import subprocess
import sys

import pytest

from largefr.data import prepare_image_index
from largefr.data.rec_set import resolve_rec_set
from largefr.data.recordio import RecordFile, read_index, unpack_header
from largefr.data.rewrite import merge, shuffle
from largefr.data.verify import stats
from tests.test_insightface_layouts import IDENTITIES, LAYOUTS, PER_IDENTITY, SIDE, write_layout

IMAGES = IDENTITIES * PER_IDENTITY


def _run(repo_root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/rec.py", *args], cwd=repo_root, capture_output=True, text=True,
                          timeout=120)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def faulty(tmp_path) -> tuple[str, dict[str, tuple[int, int]]]:
    """A RecBuilder-layout set with one planted fault of each kind: {kind: (key, offset)}."""
    folder = str(tmp_path / "faulty")
    write_layout("rec_builder", folder)
    rec, idx = os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")
    offsets, size = read_index(idx), os.path.getsize(rec)
    _patch(rec, offsets[3], b"\0\0\0\0")  # the frame's magic
    _patch(rec, offsets[5] + 8 + 4, struct.pack("<f", 99.0))  # the label of a 6-class set
    _patch(rec, offsets[7] + 8 + 24, b"TEXT, NOT AN IMAGE")  # the image bytes
    _patch(rec, offsets[10] + 8 + 24 + 40, b"\0" * 200)  # a JPEG signature, then garbage: found by --decode
    with open(rec, "r+b") as f:
        f.truncate(size - 100)  # inside the last record (key 23)
    with open(idx, "a") as f:
        f.write(f"999\t{size + 4096}\n")
    faults = {"bad_magic": 3, "label_range": 5, "not_image": 7, "truncated": 23, "past_end": 999}
    return folder, {kind: (key, size + 4096 if key == 999 else offsets[key]) for kind, key in faults.items()}


def test_verify_names_every_planted_fault(repo_root, faulty, tmp_path):
    folder, faults = faulty
    result = _run(repo_root, "verify", "--rec", folder, "--json", str(tmp_path / "report.json"))
    assert result.returncode == 1, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    found = {f["kind"]: (f["key"], f["offset"]) for f in report["findings"]}
    assert found == faults
    assert all(f["file"] == os.path.join(folder, "train.rec") for f in report["findings"])
    lines = result.stdout.splitlines()
    rec = os.path.join(folder, "train.rec")
    for expected in (f"{rec} key 3: wrong magic 0x00000000 at offset {faults['bad_magic'][1]}",
                     f"{rec} key 5 (offset {faults['label_range'][1]}): label 99 is outside [0, {IDENTITIES})",
                     f"{rec} key 7 (offset {faults['not_image'][1]}): the payload does not start like an image",
                     f"{rec} key 23: record at offset {faults['truncated'][1]} declares",
                     f"{rec[:-4]}.idx: key 999 points at offset {faults['past_end'][1]}, past the end of {rec}"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert lines[-1].startswith(f"verified {IMAGES + 1} records in 1 files") and " 5 bad (" in lines[-1]


def test_verify_decode_finds_an_undecodable_image(faulty):
    from largefr.data.verify import verify

    folder, faults = faulty
    report = verify(folder, decode=True, workers=2, progress=None)
    undecodable = [(f.key, f.kind) for f in report.findings if f.kind == "undecodable"]
    assert undecodable == [(10, "undecodable")]
    assert {f.kind for f in report.findings} == set(faults) | {"undecodable"}


def test_verify_of_a_sound_set_passes(repo_root, tmp_path):
    write_layout("faces_emore", tmp_path / "ok")
    result = _run(repo_root, "verify", "--rec", str(tmp_path / "ok"), "--decode", "--workers", "1")
    assert result.returncode == 0 and result.stdout.strip().endswith(": 0 bad"), result.stdout + result.stderr


def test_stats_counts_identities_images_and_image_kinds(repo_root, tmp_path):
    write_layout("faces_emore", tmp_path / "set")
    found = stats(str(tmp_path / "set"), sample=0)
    assert (found["images"], found["identities"], found["files"]) == (IMAGES, IDENTITIES, 1)
    assert found["images_per_identity"]["histogram"] == {"4-7": IDENTITIES}
    assert found["formats"] == {"jpeg": IMAGES} and found["sizes"] == {f"{SIDE}x{SIDE}": IMAGES}
    result = _run(repo_root, "stats", "--rec", str(tmp_path / "set"), "--sample", "5")
    assert result.returncode == 0 and f"{IMAGES} images of {IDENTITIES} identities" in result.stdout
    assert "formats of 5 images: {'jpeg': 5}" in result.stdout


def _records(rec) -> collections.Counter:
    """(class label, image bytes) of every image record of a set."""
    index = prepare_image_index(rec)
    out = collections.Counter()
    for position in range(len(index)):
        path, key, offset = index.record(position)
        _, label, _, _, image = unpack_header(RecordFile(path).read_at(offset, key))
        out[(label if isinstance(label, float) else label[0], image)] += 1
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rewrite")
    for layout in LAYOUTS:
        write_layout(layout, root / layout)
    return {layout: str(root / layout) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shuffle_keeps_every_record(layouts, layout, tmp_path):
    assert shuffle(layouts[layout], str(tmp_path / "a"), seed=1, progress=None) == IMAGES
    assert _records(str(tmp_path / "a")) == _records(layouts[layout])
    shuffle(layouts[layout], str(tmp_path / "b"), seed=1, shard_images=10, progress=None)
    shuffle(layouts[layout], str(tmp_path / "c"), seed=2, progress=None)
    order = [prepare_image_index(str(tmp_path / name)).labels.tolist() for name in ("a", "b", "c")]
    assert order[0] == order[1] != order[2]  # seeded: shards or one file, the same order
    assert len(resolve_rec_set(str(tmp_path / "b")).files) == 3
    assert (tmp_path / "a" / "property").read_text() == f"{IDENTITIES},{SIDE},{SIDE}\n{IMAGES}\n"


def test_merge_keeps_every_record_with_labels_moved_past_earlier_sets(layouts, repo_root, tmp_path):
    out = str(tmp_path / "merged")
    result = _run(repo_root, "merge", *[arg for layout in LAYOUTS for arg in ("--rec", layouts[layout])],
                  "--out", out, "--shard-images", "25")
    assert result.returncode == 0, result.stderr
    assert f"wrote {4 * IMAGES} images of {4 * IDENTITIES} classes" in result.stdout
    expected = collections.Counter()
    for number, layout in enumerate(LAYOUTS):
        expected.update({(label + number * IDENTITIES, image): n for (label, image), n in _records(layouts[layout]).items()})
    assert _records(out) == expected
    assert len(resolve_rec_set(out).files) == 4 and resolve_rec_set(out).property() == (4 * IDENTITIES, SIDE, SIDE,
                                                                                         4 * IMAGES)
    kept, classes = merge([layouts["faces_emore"], layouts["im2rec"]], str(tmp_path / "kept"), keep_labels=True,
                          progress=None)
    assert (kept, classes) == (2 * IMAGES, IDENTITIES)
    assert _records(str(tmp_path / "kept")) == _records(layouts["faces_emore"]) + _records(layouts["im2rec"])
    result = _run(repo_root, "merge", "--rec", layouts["im2rec"], "--out", out)
    assert result.returncode == 1 and "already holds manifest.json; write into a new folder" in result.stderr
