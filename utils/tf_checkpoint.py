"""Read TensorFlow V2 name-based checkpoints with only the standard library and numpy.

A checkpoint ("tensor bundle") is ``PREFIX.index`` plus data shards
``PREFIX.data-SSSSS-of-NNNNN``.  The index is a LevelDB-style SSTable
(tensorflow/core/lib/io/{format.cc,block.cc,table.cc}) mapping each tensor name
to a serialized ``BundleEntryProto`` (tensorflow/core/protobuf/tensor_bundle.proto);
the empty key holds a ``BundleHeaderProto``.  Tensor bytes are stored raw in the
shard at [offset, offset + size) (tensorflow/core/util/tensor_bundle/tensor_bundle.cc).
"""

import codecs
import collections
import difflib
import functools
import math
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np


class CheckpointError(ValueError):
    """Any problem locating, parsing or verifying a checkpoint."""


class _Corrupt(Exception):
    """Malformed bytes; converted to a CheckpointError naming the file by the caller."""


# ---------------------------------------------------------------- CRC32C
# Castagnoli CRC as in tensorflow/tsl/lib/hash/crc32c.h (reflected polynomial).
_TABLE_NP = np.arange(256, dtype=np.uint32)  # byte-wise lookup table, built one bit per round
for _ in range(8):
    _TABLE_NP = (_TABLE_NP >> 1) ^ np.where(_TABLE_NP & 1, np.uint32(0x82F63B78), np.uint32(0))
_TABLE = _TABLE_NP.tolist()  # Python ints for the scalar loops
_VECTOR_MIN_BYTES = 1024  # below this the plain byte loop is faster (measured)


def _crc_update(state: int, data: bytes) -> int:
    """Advance the raw CRC register over ``data`` one byte at a time."""
    table = _TABLE
    for byte in data:
        state = table[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state


@functools.lru_cache(maxsize=None)
def _zeros_operator(length: int) -> tuple[list[int], ...]:
    """Four 256-entry tables: table k holds register ``b << 8k`` advanced over ``length`` zero bytes.

    Feeding zero bytes is linear over GF(2), so advancing a register is the XOR
    of advancing each of its four bytes separately.
    """
    regs = np.arange(256, dtype=np.uint32) << np.array([[0], [8], [16], [24]], dtype=np.uint32)
    for _ in range(length):
        regs = _TABLE_NP[regs & 0xFF] ^ (regs >> 8)
    return tuple(regs.tolist())


def _crc_chunks(state: int, chunks: np.ndarray) -> int:
    """Advance ``state`` over a (count, length) uint8 array, row after row.

    Every row is run from a zero register in parallel (numpy over rows); since
    crc(s, row) = zeros_operator(s) ^ crc(0, row), the rows are then chained.
    """
    count, length = chunks.shape
    columns = np.ascontiguousarray(chunks.T)  # contiguous reads at each byte position
    regs = np.zeros(count, dtype=np.uint32)
    for column in columns:
        regs = _TABLE_NP[regs.astype(np.uint8) ^ column] ^ (regs >> 8)
    t0, t1, t2, t3 = _zeros_operator(length)
    for reg in regs.tolist():
        state = t0[state & 0xFF] ^ t1[(state >> 8) & 0xFF] ^ t2[(state >> 16) & 0xFF] ^ t3[state >> 24] ^ reg
    return state


def crc32c(data) -> int:
    """CRC32C of a bytes-like object, vectorised with numpy for large inputs."""
    buf = np.frombuffer(data, dtype=np.uint8)
    state = 0xFFFFFFFF
    if buf.size >= _VECTOR_MIN_BYTES:
        # Chunk length ~ sqrt(n)/3 balances the per-byte-position numpy loop against
        # the per-chunk Python combine loop (measured optimum; >= 16 here); powers
        # of two keep the zeros-operator cache small.
        length = 1 << round(math.log2(buf.size) / 2 - 1.5)
        count = buf.size // length
        state = _crc_chunks(state, buf[:count * length].reshape(count, length))
        buf = buf[count * length:]
    return _crc_update(state, buf.tobytes()) ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    """Invert crc32c::Mask (rotate right 15 bits, add constant) used by TF files."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------- protobuf wire format
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, next position)."""
    result = shift = 0
    while shift < 70:
        if pos >= len(buf):
            raise _Corrupt("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise _Corrupt("varint longer than 10 bytes")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) pairs: ints for varint/fixed, bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise _Corrupt("truncated protobuf message")
        yield tag >> 3, value


# The BundleEntryProto fields this reader uses (crc is the masked CRC32C of the tensor bytes).
_Entry = collections.namedtuple("_Entry", "dtype shape shard offset size crc sliced")


def _parse_entry(buf: bytes) -> _Entry:
    """BundleEntryProto: dtype=1 shape=2 shard_id=3 offset=4 size=5 crc32c=6 slices=7."""
    fields = {1: 0, 2: b"", 3: 0, 4: 0, 5: 0, 6: 0}
    sliced = False
    for field, value in _proto_fields(buf):
        fields[field] = value
        sliced |= field == 7
    # TensorShapeProto (tensorflow/core/framework/tensor_shape.proto): repeated Dim dim = 2 {int64 size = 1}.
    shape = tuple(dict(_proto_fields(dim)).get(1, 0) for field, dim in _proto_fields(fields[2]) if field == 2)
    return _Entry(fields[1], shape, fields[3], fields[4], fields[5], fields[6], sliced)


# ---------------------------------------------------------------- SSTable (.index)
_FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes + 8-byte magic (format.h)
_TABLE_MAGIC = 0xDB4775248B80FB57


def _varints(buf: bytes, count: int, pos: int = 0) -> tuple[list[int], int]:
    """``count`` consecutive varints from ``pos``; return (values, next position)."""
    values = []
    for _ in range(count):
        value, pos = _varint(buf, pos)
        values.append(value)
    return values, pos


def _read_block(data: bytes, offset: int, size: int) -> bytes:
    """Block contents after checking its 5-byte trailer (type byte + masked CRC32C)."""
    if offset + size + 5 > len(data):
        raise _Corrupt(f"block at offset {offset} runs past the end of the file (truncated?)")
    block = data[offset:offset + size + 1]
    stored = int.from_bytes(data[offset + size + 1:offset + size + 5], "little")
    if crc32c(block) != _unmask(stored):
        raise _Corrupt(f"block at offset {offset} fails its CRC32C check")
    if block[-1] != 0:  # 1 = kSnappyCompression; TF writes bundle indexes uncompressed
        kind = "snappy" if block[-1] == 1 else f"unknown type {block[-1]}"
        raise _Corrupt(f"block at offset {offset} uses {kind} compression, which is unsupported")
    return block[:-1]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) of a block: prefix-compressed entries, then restart array + count."""
    end = len(block) - 4 * (int.from_bytes(block[-4:], "little") + 1)
    if end < 0:
        raise _Corrupt("block is too short for its restart array")
    pos, key = 0, b""
    while pos < end:
        (shared, non_shared, value_len), pos = _varints(block, 3, pos)
        if shared > len(key) or pos + non_shared + value_len > end:
            raise _Corrupt("bad block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _table_items(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable, in file order (table.cc two-level iterator)."""
    if len(data) < _FOOTER_SIZE:
        raise _Corrupt(f"file is {len(data)} bytes, too short for the {_FOOTER_SIZE}-byte table footer")
    footer = data[-_FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
        raise _Corrupt("bad table magic number (not a checkpoint index, or truncated)")
    # BlockHandles (varint offset, varint size) of the metaindex block (empty in TF tables) and index block.
    (_, _, index_offset, index_size), _ = _varints(footer, 4)
    for _, handle in _block_entries(_read_block(data, index_offset, index_size)):
        (offset, size), _ = _varints(handle, 2)
        yield from _block_entries(_read_block(data, offset, size))


# ---------------------------------------------------------------- tensors
# DataType enum (tensorflow/core/framework/types.proto) -> numpy code as stored.
_DTYPES = {1: "f4", 2: "f8", 3: "i4", 4: "u1", 5: "i2", 6: "i1", 8: "c8", 9: "i8", 10: "b1",
           14: "u2", 17: "u2", 18: "c16", 19: "f2", 22: "u4", 23: "u8"}
_DT_BFLOAT16 = 14
_DT_NAMES = {7: "DT_STRING", 20: "DT_RESOURCE", 21: "DT_VARIANT"}
_SHARD_RE = re.compile(r"\.data-\d{5}-of-\d{5}$")


def _parse_header(buf: bytes) -> tuple[int, str]:
    """BundleHeaderProto -> (num_shards, numpy byte-order char)."""
    fields = dict(_proto_fields(buf))
    num_shards, endianness = fields.get(1, 0), fields.get(2, 0)
    # VersionDef.min_consumer (field 2): bundles newer than version 1 need a newer reader.
    min_consumer = dict(_proto_fields(fields.get(3, b""))).get(2, 0)
    if num_shards < 1 or endianness not in (0, 1) or min_consumer > 1:
        raise _Corrupt(f"unsupported bundle header (num_shards={num_shards}, "
                       f"endianness={endianness}, min_consumer={min_consumer})")
    return num_shards, "<" if endianness == 0 else ">"


def _state_file_prefix(folder: Path) -> str:
    """Prefix named by ``model_checkpoint_path`` in a TF ``checkpoint`` state file."""
    state = folder / "checkpoint"
    match = re.search(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"',
                      state.read_text(encoding="utf-8", errors="replace"), re.MULTILINE)
    if not match:
        raise CheckpointError(f"{state}: no model_checkpoint_path line in the checkpoint state file")
    # Text-format strings are C-escaped; relative paths are relative to the folder
    # (tensorflow/python/checkpoint/checkpoint_management.py).
    recorded = codecs.escape_decode(match.group(1).encode())[0].decode("utf-8")
    prefix = folder / recorded
    if not Path(f"{prefix}.index").is_file():
        # Absolute paths go stale when a folder is moved: fall back to its basename here.
        prefix = folder / Path(recorded).name
    if not Path(f"{prefix}.index").is_file():
        raise CheckpointError(f"{state}: names checkpoint {recorded!r}, but {prefix}.index does not exist")
    return str(prefix)


def resolve_checkpoint_prefix(path: str | os.PathLike) -> str:
    """Map a checkpoint folder, prefix, ``.index`` file or data shard to the prefix."""
    path = Path(path)
    if path.is_dir():
        if (path / "checkpoint").is_file():
            return _state_file_prefix(path)
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            found = ", ".join(p.name for p in indexes) or "none"
            raise CheckpointError(f"{path}: expected a 'checkpoint' state file or exactly one "
                                  f"*.index file in this folder (found *.index: {found})")
        return str(indexes[0])[:-len(".index")]
    text = str(path)
    for prefix in (re.sub(r"\.index$", "", text), _SHARD_RE.sub("", text), text):
        if Path(f"{prefix}.index").is_file():
            return prefix
    raise CheckpointError(f"{path}: no checkpoint found (looked for a folder with a 'checkpoint' "
                          f"file or a *.index file, for {text}.index, and for an .index/.data-* path)")


class TFCheckpointReader:
    """Random access to the tensors of a TF V2 checkpoint; the index is parsed eagerly."""

    def __init__(self, path: str | os.PathLike, verify_crc: bool = True):
        self.prefix = resolve_checkpoint_prefix(path)
        self.verify_crc = verify_crc
        self._index_path = f"{self.prefix}.index"
        try:
            self._load_index(Path(self._index_path).read_bytes())
        except OSError as exc:
            raise CheckpointError(f"{self._index_path}: cannot read checkpoint index: {exc}") from None
        except _Corrupt as exc:
            raise CheckpointError(f"{self._index_path}: bad checkpoint index: {exc}") from None
        self._check_shards()

    def _load_index(self, data: bytes) -> None:
        """Fill the header fields and the name -> _Entry map from the index bytes."""
        self._entries: dict[str, _Entry] = {}
        header = None
        for key, value in _table_items(data):
            if key == b"":
                header = _parse_header(value)
            elif not key.startswith(b"\x00"):  # slices of partitioned variables (EncodeTensorNameSlice)
                self._entries[key.decode("utf-8", "replace")] = _parse_entry(value)
        if header is None:
            raise _Corrupt("no bundle header entry (empty key)")
        self._num_shards, self._byteorder = header

    def _shard_path(self, shard: int) -> str:
        """Data file name as in tensor_bundle/naming.cc DataFilename."""
        return f"{self.prefix}.data-{shard:05d}-of-{self._num_shards:05d}"

    def _check_shards(self) -> None:
        """Every referenced shard must exist and hold the byte ranges its entries claim."""
        sizes: dict[str, int] = {}
        for name, entry in self._entries.items():
            shard_path = self._shard_path(entry.shard)
            if shard_path not in sizes:
                if not os.path.isfile(shard_path):
                    raise CheckpointError(f"{shard_path}: data shard is missing (needed by tensor '{name}')")
                sizes[shard_path] = os.path.getsize(shard_path)
            if entry.offset + entry.size > sizes[shard_path]:
                raise CheckpointError(f"{shard_path}: data shard is truncated: it has {sizes[shard_path]} "
                                      f"bytes but tensor '{name}' ends at byte {entry.offset + entry.size}")

    def names(self) -> list[str]:
        """Sorted tensor names (the header entry excluded)."""
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        """Entry for ``name``, or a CheckpointError suggesting close names."""
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise CheckpointError(f"{self._index_path}: no tensor named {name!r}{hint}") from None

    def _stored_dtype(self, name: str) -> np.dtype:
        """numpy dtype of the bytes on disk (bfloat16 as uint16)."""
        entry = self._entry(name)
        if entry.sliced:
            raise CheckpointError(f"{self._index_path}: tensor '{name}' is a partitioned (sliced) "
                                  f"variable, which this reader does not support")
        if entry.dtype not in _DTYPES:
            kind = _DT_NAMES.get(entry.dtype, f"DataType enum {entry.dtype}")
            raise CheckpointError(f"{self._index_path}: tensor '{name}' has unsupported dtype {kind}")
        return np.dtype(self._byteorder + _DTYPES[entry.dtype])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        """dtype of the arrays ``read`` returns (native byte order; bfloat16 -> float32)."""
        stored = self._stored_dtype(name)
        return np.dtype(np.float32) if self._entry(name).dtype == _DT_BFLOAT16 else stored.newbyteorder("=")

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh native-endian array, CRC-checked unless disabled."""
        entry, stored = self._entry(name), self._stored_dtype(name)
        shard_path = self._shard_path(entry.shard)
        if math.prod(entry.shape) * stored.itemsize != entry.size:
            raise CheckpointError(f"{self._index_path}: tensor '{name}' has shape {entry.shape} of "
                                  f"{stored} but {entry.size} bytes: the index is corrupt")
        raw = np.empty(entry.size, dtype=np.uint8)
        try:
            with open(shard_path, "rb") as f:
                f.seek(entry.offset)
                got = f.readinto(raw)
        except OSError as exc:
            raise CheckpointError(f"{shard_path}: cannot read tensor '{name}': {exc}") from None
        if got != entry.size:
            raise CheckpointError(f"{shard_path}: tensor '{name}' is truncated "
                                  f"(got {got} of {entry.size} bytes at offset {entry.offset})")
        # tensor_bundle.cc stores crc32c::Mask(crc) of the raw tensor bytes.
        if self.verify_crc and crc32c(raw) != _unmask(entry.crc):
            raise CheckpointError(f"{shard_path}: tensor '{name}' fails its CRC32C check: the file is corrupt")
        array = raw.view(stored).reshape(entry.shape)
        if entry.dtype == _DT_BFLOAT16:  # bfloat16 is the top half of a float32
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array if stored.isnative else array.astype(stored.newbyteorder("="))

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor, by sorted name."""
        return {name: self.read(name) for name in self.names()}
