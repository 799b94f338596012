"""MXNet RecordIO in insightface's layout: framing, image headers, indexed reading, writing.

Framing (dmlc-core): every record part is `uint32 magic 0xced7230a`, `uint32 lrec` (low 29 bits:
length, high 3 bits: continuation flag 0 whole / 1 first / 2 middle / 3 last), the bytes, zero
padding to 4. A payload holding the magic at a 4-aligned position is split there into parts (the
magic is dropped and re-inserted on reading), so a reader scanning for the magic never resyncs
inside an image; such records are rare (~2^-32 per word) but occur in MS1M-sized files.

Payload: struct `<IfQQ` (flag, label, id, id2), then `flag` float32 labels when flag > 0, then the
encoded image. insightface layout: key 0 is a header with flag 2 and label
`[first_identity_key, end_key]`; images are keys `1 .. first_identity_key-1`; keys
`first_identity_key .. end_key-1` hold one record per identity with label
`[first_image_key, end_image_key]`. `train.idx` is text `key\\toffset`; `property` is `C,H,W`.
insightface's current RecBuilder writes another layout: images from key 0, no header nor identity
records, a label that may be a vector (class = its first element), a second `property` line holding
the number of images and a pickled `train.meta` beside them (not needed here). Both are read.
"""
from __future__ import annotations

import array
import operator
import os
import random
import struct
import tempfile
from collections.abc import Iterable, Sequence

from largefr.errors import UsageError, UserError

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_IR_FORMAT = "<IfQQ"
IR_HEADER_SIZE = struct.calcsize(_IR_FORMAT)  # 24 bytes

Label = float | tuple[float, ...]


class RecordIOError(UserError):
    """A RecordIO/idx/property file is malformed; the message names the file and key or offset."""


class BadImageError(RecordIOError):
    """A well-formed record whose image bytes cannot be decoded (policy data.on_bad_image)."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


# ---------------------------------------------------------------------------------------------
# payload headers


def pack_header(label: float | Sequence[float], image: bytes = b"", *, id: int = 0, id2: int = 0) -> bytes:
    """Payload for `label` and encoded `image`: a scalar label gives flag 0, a sequence flag=len."""
    if isinstance(label, (int, float)):
        return struct.pack(_IR_FORMAT, 0, float(label), id, id2) + image
    labels = [float(v) for v in label]
    extra = struct.pack(f"<{len(labels)}f", *labels)
    return struct.pack(_IR_FORMAT, len(labels), 0.0, id, id2) + extra + image


def unpack_header(payload: bytes) -> tuple[int, Label, int, int, bytes]:
    """(flag, label or labels, id, id2, image bytes) of one payload, as mxnet.recordio.unpack."""
    if len(payload) < IR_HEADER_SIZE:
        raise RecordIOError(f"payload of {len(payload)} bytes is shorter than the {IR_HEADER_SIZE}-byte header")
    flag, label, rec_id, rec_id2 = struct.unpack_from(_IR_FORMAT, payload)
    body = payload[IR_HEADER_SIZE:]
    if flag == 0:
        return flag, label, rec_id, rec_id2, bytes(body)
    if len(body) < 4 * flag:
        raise RecordIOError(f"header announces {flag} float labels but the payload holds {len(body)} bytes")
    labels = struct.unpack_from(f"<{flag}f", body)
    return flag, tuple(labels), rec_id, rec_id2, bytes(body[4 * flag:])


def first_label(label: Label) -> float:
    """The class label of an image record (insightface takes label[0] of a label vector)."""
    return label if isinstance(label, float) else label[0]


# ---------------------------------------------------------------------------------------------
# framing


def _part(cflag: int, data: bytes | memoryview) -> bytes:
    pad = b"\0" * (_align4(len(data)) - len(data))
    return _MAGIC_BYTES + struct.pack("<I", (cflag << _LENGTH_BITS) | len(data)) + bytes(data) + pad


def encode_record(payload: bytes) -> bytes:
    """Frame `payload` as dmlc-core's RecordIOWriter does (split at 4-aligned magic words)."""
    if len(payload) > _LENGTH_MASK:
        raise RecordIOError(f"record of {len(payload)} bytes exceeds the RecordIO limit of 2^29 - 1")
    view = memoryview(payload)
    parts, start, pos = [], 0, payload.find(_MAGIC_BYTES)
    while pos >= 0:  # bytes.find, then keep only 4-aligned magic words (dmlc-core splits at those)
        if pos % 4 == 0:
            parts.append(_part(1 if start == 0 else 2, view[start:pos]))
            start = pos + 4
        pos = payload.find(_MAGIC_BYTES, start if pos % 4 == 0 else pos + 1)
    parts.append(_part(0 if start == 0 else 3, view[start:]))
    return b"".join(parts)


def _decode_at(read, file_size: int, offset: int, where: str) -> bytes:
    """Payload of the record at `offset`; `read(n, off)` reads bytes. `where` names file and key."""
    chunks: list[bytes] = []
    while True:
        if offset + 8 > file_size:
            raise RecordIOError(f"{where}: record header at offset {offset} runs past the end of the file "
                                f"({file_size} bytes): the .rec is truncated or the .idx belongs to another file")
        magic, lrec = struct.unpack("<II", read(8, offset))
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(f"{where}: wrong magic 0x{magic:08x} at offset {offset} (expected "
                                f"0x{RECORDIO_MAGIC:08x}): the .idx does not match the .rec or the file is corrupt")
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        if offset + 8 + length > file_size:
            raise RecordIOError(f"{where}: record at offset {offset} declares {length} bytes but the file ends "
                                f"at {file_size}: the .rec is truncated; re-copy or re-pack it")
        allowed = (2, 3) if chunks else (0, 1)  # whole or first part, then middle or last parts
        if cflag not in allowed:
            raise RecordIOError(f"{where}: continuation flag {cflag} at offset {offset} where {allowed} may "
                                "appear: the file is corrupt")
        chunks.append(read(length, offset + 8))
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(chunks)
        offset += 8 + _align4(length)


# ---------------------------------------------------------------------------------------------
# index and property files


def read_index(path_idx: str) -> dict[int, int]:
    """key -> offset from a `key\\toffset` text index; malformed lines and duplicate keys are errors."""
    offsets: dict[int, int] = {}
    with open(path_idx, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = (int(v) for v in fields)
            except ValueError:
                raise RecordIOError(f"{path_idx}: line {line_no} is {line.strip()!r}, expected 'key<TAB>offset'") from None
            if key < 0 or offset < 0:
                raise RecordIOError(f"{path_idx}: line {line_no}: negative key or offset ({key}, {offset})")
            if key in offsets:
                raise RecordIOError(f"{path_idx}: duplicate key {key} (line {line_no}, offsets {offsets[key]} "
                                    f"and {offset}): the index is corrupt; rebuild it")
            offsets[key] = offset
    return offsets


def read_property_file(folder: str) -> tuple[int, int, int, int | None]:
    """(num_classes, H, W, num_images or None) from `folder/property`.

    insightface's packing scripts write one line `num_classes,H,W`; its RecBuilder adds a second line
    holding the number of images.
    """
    path = os.path.join(folder, "property")
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        raise RecordIOError(f"{path}: missing; it must hold 'num_classes,height,width' (e.g. 85742,112,112)") from None
    if not 1 <= len(lines) <= 2:
        raise RecordIOError(f"{path}: holds {len(lines)} lines, expected 'num_classes,height,width' and "
                            "optionally a second line with the number of images")
    try:
        num_classes, height, width = (int(v) for v in lines[0].split(","))
        num_images = int(lines[1]) if len(lines) == 2 else None
    except ValueError:
        raise RecordIOError(f"{path}: holds {' / '.join(lines)!r}, expected 'num_classes,height,width' "
                            "(and optionally a line with the number of images)") from None
    if min(num_classes, height, width) <= 0 or (num_images is not None and num_images <= 0):
        raise RecordIOError(f"{path}: values must be positive, got {' / '.join(lines)!r}")
    return num_classes, height, width, num_images


def read_property(folder: str) -> tuple[int, int, int]:
    """(num_classes, H, W) from `folder/property` (insightface writes `num_classes,H,W`)."""
    return read_property_file(folder)[:3]


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# reading


class RecordFile:
    """pread access to a .rec by byte offset; the descriptor is opened lazily and reopened after a
    fork, so one object can be handed to DataLoader workers (each gets its own descriptor)."""

    def __init__(self, path_rec: str) -> None:
        if not os.path.isfile(path_rec):
            raise RecordIOError(f"{path_rec}: no such file")
        self.path_rec = path_rec
        self.file_size = os.path.getsize(path_rec)
        self._fd: int | None = None
        self._fd_pid = -1

    def _read(self, size: int, offset: int) -> bytes:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.path_rec, os.O_RDONLY)
            self._fd_pid = os.getpid()
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise RecordIOError(f"{self.path_rec}: short read of {len(data)}/{size} bytes at offset {offset}: "
                                "the file shrank while open")
        return data

    def read_at(self, offset: int, key: int | None = None) -> bytes:
        """Payload of the record at byte `offset` (`key` only names it in errors)."""
        where = self.path_rec if key is None else f"{self.path_rec} key {key}"
        return _decode_at(self._read, self.file_size, offset, where)

    def read_sample_at(self, offset: int, key: int | None = None) -> tuple[float, bytes]:
        """(class label, encoded image bytes) of the image record at `offset`."""
        payload = self.read_at(offset, key)
        try:
            _, label, _, _, image = unpack_header(payload)
        except RecordIOError as err:
            raise RecordIOError(f"{self.path_rec} key {key} (offset {offset}): {err}") from None
        return first_label(label), image

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_fd_pid": -1}

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


class IndexedRecordReader:
    """Random access to the records of a .rec by the keys of its .idx.

    Opening checks every idx offset against the file size (and refuses duplicate keys); `read`
    checks magic and lengths. Safe to hand to DataLoader workers (see RecordFile).
    """

    def __init__(self, path_rec: str, path_idx: str | None = None) -> None:
        self.path_idx = path_idx if path_idx is not None else os.path.splitext(path_rec)[0] + ".idx"
        self.file = RecordFile(path_rec)
        self.path_rec = path_rec
        if not os.path.isfile(self.path_idx):
            raise RecordIOError(f"{self.path_idx}: no such file (the index of {path_rec})")
        self.offsets = read_index(self.path_idx)
        self.file_size = self.file.file_size
        for key, offset in self.offsets.items():
            if offset + 8 > self.file_size:
                raise RecordIOError(f"{self.path_idx}: key {key} points at offset {offset}, past the end of "
                                    f"{path_rec} ({self.file_size} bytes): the .rec is truncated or the .idx "
                                    "belongs to another file")
        self.keys = sorted(self.offsets)

    def offset_of(self, key: int) -> int:
        try:
            return self.offsets[key]
        except KeyError:
            raise RecordIOError(f"{self.path_idx}: key {key} is missing from the index of {self.path_rec}") from None

    def read(self, key: int) -> bytes:
        """The payload of record `key` (header + labels + image bytes)."""
        return self.file.read_at(self.offset_of(key), key)

    def read_sample(self, key: int) -> tuple[float, bytes]:
        """(class label, encoded image bytes) of image record `key`."""
        return self.file.read_sample_at(self.offset_of(key), key)

    def image_keys(self) -> list[int]:
        """Image keys: 1..label[0]-1 when record 0 is a header (a label vector and no image: faces_emore's
        layout), else every key (RecBuilder's layout, images from key 0, labels scalar or vectors)."""
        if 0 not in self.offsets:
            return list(self.keys)
        flag, label, _, _, image = unpack_header(self.read(0))
        if flag == 0 or image:  # an image record 0 (insightface's RecBuilder layout), not a header
            return list(self.keys)
        end = int(label[0])
        missing = [k for k in range(1, end) if k not in self.offsets]
        if missing:
            raise RecordIOError(f"{self.path_idx}: image key {missing[0]} (of {len(missing)} missing) is absent; "
                                f"header record 0 of {self.path_rec} declares images 1..{end - 1}; "
                                "rebuild the index or re-pack the data")
        return list(range(1, end))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "IndexedRecordReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# writing


def _checked_label(label: object, num_classes: int, index: int) -> int:
    try:
        value = operator.index(label)  # accepts numpy integers, refuses floats
    except TypeError:
        value = -1
    if isinstance(label, bool) or not 0 <= value < num_classes:
        raise UsageError(f"sample {index}: label {label!r} is not an integer in [0, {num_classes})")
    return value


def _spool_samples(spool, samples: Iterable[tuple[int, bytes]], num_classes: int):
    """Append image bytes to `spool`; return arrays of labels, spool offsets and lengths."""
    labels, offsets, lengths = array.array("q"), array.array("q"), array.array("q")
    position = 0
    for index, (label, image) in enumerate(samples):
        label = _checked_label(label, num_classes, index)
        spool.write(image)
        labels.append(label)
        offsets.append(position)
        lengths.append(len(image))
        position += len(image)
    spool.flush()
    return labels, offsets, lengths


def _identity_records(labels_in_order: Sequence[int], num_classes: int, first_image_key: int) -> list[list[float]]:
    """[first_image_key, end_image_key] of every class, images being sorted by label."""
    counts = [0] * num_classes
    for label in labels_in_order:
        counts[label] += 1
    ranges, key = [], first_image_key
    for count in counts:
        ranges.append([float(key), float(key + count)])
        key += count
    return ranges


def write_insightface_rec(out_dir: str, samples: Iterable[tuple[int, bytes]], *, num_classes: int,
                          image_size: tuple[int, int] = (112, 112), shuffle: bool = False, seed: int = 0) -> int:
    """Write `out_dir/train.rec`, `train.idx` and `property` in insightface's layout; return #images.

    `samples` are (label, encoded image bytes), streamed once (spooled to a temporary file, so
    memory stays small). shuffle=False orders images by label (stable), as insightface's own files
    are, and writes one identity record per class after the images. shuffle=True writes the images
    in a seeded random order and NO identity records (ranges would be meaningless); record 0 is then
    `[N+1, N+1]`, which insightface's and largefr's readers both accept. Files appear atomically.
    """
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir) as spool:
        labels, offsets, lengths = _spool_samples(spool, samples, num_classes)
        num_images = len(labels)
        order = list(range(num_images))
        if shuffle:
            random.Random(seed).shuffle(order)
        else:
            order.sort(key=labels.__getitem__)
        identities = [] if shuffle else _identity_records([labels[i] for i in order], num_classes, 1)
        path_rec = os.path.join(out_dir, "train.rec")
        tmp_rec = f"{path_rec}.tmp-{os.getpid()}"
        index_lines: list[str] = []
        try:
            _write_records(tmp_rec, spool, order, labels, offsets, lengths, identities, index_lines)
        except BaseException:
            if os.path.exists(tmp_rec):
                os.remove(tmp_rec)
            raise
    _write_atomic(os.path.join(out_dir, "train.idx"), "".join(index_lines).encode("ascii"))
    os.replace(tmp_rec, path_rec)
    _write_atomic(os.path.join(out_dir, "property"), f"{num_classes},{image_size[0]},{image_size[1]}\n".encode())
    return num_images


def _write_records(tmp_rec: str, spool, order: Sequence[int], labels, offsets, lengths,
                   identities: Sequence[list[float]], index_lines: list[str]) -> None:
    """Header record 0, images in `order` (keys 1..N), then identity records; fills index_lines."""
    first_identity_key = len(order) + 1
    with open(tmp_rec, "wb") as rec:
        def put(key: int, payload: bytes) -> None:
            index_lines.append(f"{key}\t{rec.tell()}\n")
            rec.write(encode_record(payload))

        put(0, pack_header([float(first_identity_key), float(first_identity_key + len(identities))]))
        for key, source in enumerate(order, 1):
            spool.seek(offsets[source])
            put(key, pack_header(float(labels[source]), spool.read(lengths[source]), id=key))
        for key, image_range in enumerate(identities, first_identity_key):
            put(key, pack_header(image_range, id=key))
