"""Which .rec files data.rec names: one insightface folder, a folder of shards, a file, or a list of them.

A record set is an ordered list of (.rec, .idx) pairs read as one data set: its images are numbered
in file order, then in offset order inside each file (one global image order for every loader).
- a folder holding `train.rec` (insightface's layout, any variant): that one file;
- a folder holding shards `train-00000.rec`, `train-00001.rec`, ... (tools/pack_rec.py): every shard
  in name order; a `manifest.json` there, when present, must list exactly these shards;
- a `.rec` file: that file with the `.idx` beside it;
- a list of any of these: their files in list order.
The `property` file (`num_classes,H,W`) is the one in the folder of the first file; any other folder's
property must agree on H and W (labels share one identity space: classes are the largest count).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from largefr.data.recordio import RecordIOError, read_property_file

SHARD_PATTERN = re.compile(r"^train-(\d{5,})\.rec$")
"""Shard names: `train-` and a zero-padded number of at least five digits."""
MANIFEST_FILE = "manifest.json"
"""The shard set's manifest (tools/pack_rec.py writes it last)."""
SINGLE_REC = "train.rec"


def shard_name(number: int) -> str:
    """The file stem of shard `number` (`train-00012`)."""
    return f"train-{number:05d}"


@dataclass(frozen=True)
class RecFile:
    """One .rec file and its index."""

    rec: str
    idx: str


@dataclass(frozen=True)
class RecSet:
    """The files of a record set, in reading order, and the folder whose `property` describes them."""

    files: tuple[RecFile, ...]
    property_dirs: tuple[str, ...]
    """Folders holding a property file, the first one the set's."""
    source: str
    """data.rec as given, for messages."""

    @property
    def first_folder(self) -> str:
        return os.path.dirname(self.files[0].rec)

    def property(self) -> tuple[int, int, int, int | None] | None:
        """(num_classes, H, W, num_images or None) of the set, or None without a property file."""
        if not self.property_dirs:
            return None
        found = [read_property_file(folder) for folder in self.property_dirs]
        first = found[0]
        for folder, other in zip(self.property_dirs[1:], found[1:]):
            if other[1:3] != first[1:3]:
                raise RecordIOError(f"{folder}/property: images are {other[1]}x{other[2]} but "
                                    f"{self.property_dirs[0]}/property says {first[1]}x{first[2]}; "
                                    "every part of data.rec must hold one image size")
        num_images = first[3] if len(found) == 1 else None
        return max(f[0] for f in found), first[1], first[2], num_images


def data_folder(rec: str | Sequence[str] | None) -> str | None:
    """The folder data.rec names (a list: its first entry's; a .rec file: the folder holding it)."""
    first = rec if isinstance(rec, str) or rec is None else (rec[0] if rec else None)
    if first is None or not first.endswith(".rec"):
        return first
    return os.path.dirname(first)


def _shards_in(folder: str) -> list[str]:
    numbered = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := SHARD_PATTERN.match(name)))
    return [name for _, name in numbered]


def _check_manifest(folder: str, shards: list[str]) -> None:
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    listed = [shard["name"] + ".rec" for shard in manifest.get("shards", [])]
    if not manifest.get("complete", False):
        raise RecordIOError(f"{path}: the pack is incomplete ({len(listed)} shards finished); run "
                            "tools/pack_rec.py again with the same arguments to resume it")
    if listed != shards:
        missing = sorted(set(listed) - set(shards)) or sorted(set(shards) - set(listed))
        raise RecordIOError(f"{path}: lists {len(listed)} shards but {folder} holds {len(shards)} "
                            f"(first difference: {missing[:1]}); restore the shard or pack again")


def _files_of(entry: str) -> tuple[list[RecFile], str | None]:
    """(files, folder whose property applies or None) of one data.rec entry."""
    if os.path.isfile(entry):
        if not entry.endswith(".rec"):
            raise RecordIOError(f"{entry}: data.rec names a file that is not a .rec")
        folder = os.path.dirname(os.path.abspath(entry))
        return [RecFile(entry, entry[:-4] + ".idx")], folder
    if not os.path.isdir(entry):
        raise RecordIOError(f"{entry}: no such folder or .rec file (data.rec names a folder holding train.rec or "
                            "train-NNNNN.rec shards, a .rec file, or a list of them)")
    if os.path.isfile(os.path.join(entry, SINGLE_REC)):
        names = [SINGLE_REC]
    else:
        names = _shards_in(entry)
        if not names and os.path.isfile(os.path.join(entry, "train.idx")):
            raise RecordIOError(f"{os.path.join(entry, SINGLE_REC)}: no such file (data.rec must hold train.rec, "
                                "train.idx and property; only train.idx is there)")
        if not names:
            raise RecordIOError(f"{entry}: holds neither train.rec nor train-NNNNN.rec shards (data.rec must hold "
                                "train.rec, train.idx and property, or the shards tools/pack_rec.py writes)")
        _check_manifest(entry, names)
    files = [RecFile(os.path.join(entry, name), os.path.join(entry, name[:-4] + ".idx")) for name in names]
    return files, entry


def resolve_rec_set(rec: str | Sequence[str]) -> RecSet:
    """The record set data.rec names (see the module docstring); every .rec must have its .idx."""
    entries = [rec] if isinstance(rec, str) else list(rec)
    if not entries:
        raise RecordIOError("data.rec is an empty list; name a folder, a .rec file or a list of them")
    files: list[RecFile] = []
    property_dirs: list[str] = []
    for entry in entries:
        found, folder = _files_of(entry)
        files += found
        if folder and folder not in property_dirs and os.path.isfile(os.path.join(folder, "property")):
            property_dirs.append(folder)
    for file in files:
        if not os.path.isfile(file.idx):
            raise RecordIOError(f"{file.idx}: no such file (the index of {file.rec})")
    seen = set()
    for file in files:
        real = os.path.realpath(file.rec)
        if real in seen:
            raise RecordIOError(f"{file.rec}: named twice in data.rec {rec!r}")
        seen.add(real)
    return RecSet(files=tuple(files), property_dirs=tuple(property_dirs),
                  source=rec if isinstance(rec, str) else ", ".join(entries))
