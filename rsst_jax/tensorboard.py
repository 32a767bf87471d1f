"""TensorBoard event files without TensorFlow: scalars only, written and read back.

An event file is a sequence of TFRecords (``uint64`` length, masked CRC-32C of the
length, the bytes, masked CRC-32C of the bytes; little endian), each holding one
``Event`` protobuf. Only the fields TensorBoard needs for scalars are written, encoded
by hand:

- ``Event``: 1 ``wall_time`` (double), 2 ``step`` (int64), 3 ``file_version`` (string,
  the first record: ``brain.Event:2``), 5 ``summary`` (message);
- ``Summary``: 1 repeated ``Value``; ``Value``: 1 ``tag`` (string), 2 ``simple_value``
  (float32).

``EventWriter(logdir)`` starts a new file ``events.out.tfevents.<time>.<host>`` in
``logdir``, keeps scalars in memory and appends them at ``flush()``;
``read_scalars(logdir)`` reads every event file there back, checking each CRC.
``tensorboard --logdir DIR`` shows each directory under DIR holding event files as one
run.
"""
from __future__ import annotations

import pathlib
import socket
import struct
import time
from typing import Iterable, Mapping, NamedTuple, Optional

FILE_VERSION = b"brain.Event:2"
PREFIX = "events.out.tfevents."


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # reflected Castagnoli polynomial
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """The CRC TFRecord stores: rotated right by 15 bits plus a constant, mod 2**32."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc(length)) + data
            + struct.pack("<I", masked_crc(data)))


# --------------------------------------------------------------------------- protobuf

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf writes it (negative: ten bytes)
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode_event(wall_time: float, step: int, *, scalars: Optional[Mapping[str, float]] = None,
                 file_version: Optional[bytes] = None) -> bytes:
    """One ``Event`` message: a file-version event or a summary of scalars."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version)
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5)
                         + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message; value: int or bytes."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            n, i = _read_varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


class Scalar(NamedTuple):
    wall_time: float
    step: int
    tag: str
    value: float


def decode_event(data: bytes) -> tuple[float, int, Optional[bytes], list[tuple[str, float]]]:
    """(wall_time, step, file_version or None, [(tag, simple_value)]) of an ``Event``."""
    wall, step, version, values = 0.0, 0, None, []
    for number, _, value in _fields(data):
        if number == 1:
            wall = struct.unpack("<d", value)[0]
        elif number == 2:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 3:
            version = value
        elif number == 5:
            for vn, _, v in _fields(value):
                if vn != 1:
                    continue
                tag, simple = None, None
                for fn, _, fv in _fields(v):
                    if fn == 1:
                        tag = fv.decode()
                    elif fn == 2:
                        simple = struct.unpack("<f", fv)[0]
                if tag is not None and simple is not None:
                    values.append((tag, simple))
    return wall, step, version, values


def read_records(path) -> list[bytes]:
    """The records of one file; ValueError on a bad CRC; a torn last record is dropped."""
    data = pathlib.Path(path).read_bytes()
    out, i = [], 0
    while i + 12 <= len(data):
        header = data[i:i + 8]
        if struct.unpack("<I", data[i + 8:i + 12])[0] != masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        n = struct.unpack("<Q", header)[0]
        if i + 12 + n + 4 > len(data):
            break  # written up to here when the process ended
        body = data[i + 12:i + 12 + n]
        if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != masked_crc(body):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        out.append(body)
        i += 16 + n
    return out


def event_files(logdir) -> list[pathlib.Path]:
    """The event files directly in ``logdir``, oldest first (by name, as TensorBoard)."""
    logdir = pathlib.Path(logdir)
    if not logdir.is_dir():
        return []
    return sorted(p for p in logdir.iterdir() if p.name.startswith(PREFIX) and p.is_file())


def read_scalars(logdir) -> list[Scalar]:
    """Every scalar in the event files of ``logdir``, in the order written."""
    out = []
    for path in event_files(logdir):
        for body in read_records(path):
            wall, step, _, values = decode_event(body)
            out.extend(Scalar(wall, step, tag, v) for tag, v in values)
    return out


class EventWriter:
    """Scalars for TensorBoard in a new event file of ``logdir``, appended at ``flush()``.

    ``skip`` holds (tag, step) pairs already written by an earlier file of this
    directory (a resumed run): those are not written again."""

    def __init__(self, logdir, *, skip: Iterable[tuple[str, int]] = ()):
        self.dir = pathlib.Path(logdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"{PREFIX}{int(now)}.{socket.gethostname()}"
        path, n = self.dir / name, 0
        while path.exists():  # two writers in one second: keep both files
            n += 1
            path = self.dir / f"{name}.{n}"
        self.path = path
        self.skip = set(skip)
        self.pending = [record(encode_event(now, 0, file_version=FILE_VERSION))]

    def scalars(self, step: int, values: Mapping[str, Optional[float]],
                wall_time: Optional[float] = None) -> None:
        """Queue ``values`` (tag -> number; None and pairs in ``skip`` left out) at ``step``."""
        values = {tag: v for tag, v in values.items()
                  if v is not None and (tag, step) not in self.skip}
        if values:
            self.skip.update((tag, step) for tag in values)
            self.pending.append(record(encode_event(
                time.time() if wall_time is None else wall_time, step, scalars=values)))

    def flush(self) -> None:
        """Append what is queued to the file."""
        if not self.pending:
            return
        with open(self.path, "ab") as f:
            f.write(b"".join(self.pending))
        self.pending = []


__all__ = ["crc32c", "masked_crc", "record", "encode_event", "decode_event", "read_records",
           "event_files", "read_scalars", "Scalar", "EventWriter", "FILE_VERSION", "PREFIX"]
