"""A minimal TF V2 checkpoint (tensor bundle) writer, so tests can build edited checkpoints without TF.

Writes the layout TF's BundleWriter produces (tensorflow/core/util/tensor_bundle/tensor_bundle.cc): raw
tensor bytes in data shards, and an SSTable index (tensorflow/core/lib/io/format.cc) holding one data
block, an empty metaindex block and the index block, each with its type byte and masked CRC32C.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.tf_checkpoint import crc32c

DTYPE_ENUM = {np.dtype("float32"): 1, np.dtype("int32"): 3, np.dtype("int64"): 9}
_MAGIC = 0xDB4775248B80FB57


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def pb(field: int, value: bytes | int) -> bytes:
    """One protobuf field: ints as varint, bytes as length-delimited."""
    if isinstance(value, bytes):
        return varint(field << 3 | 2) + varint(len(value)) + value
    return varint(field << 3) + varint(value & (2**64 - 1))


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _block(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """Entries without prefix compression, then one restart point at 0."""
    body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in pairs)
    return body + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")


def write_bundle(prefix, entries: dict, big_endian: bool = False, num_shards: int = 1, compression: int = 0):
    """Write a bundle from raw entries `{name: (dtype_enum, shape, raw bytes, shard, extra proto bytes)}`."""
    shards = {s: bytearray() for s in range(num_shards)}
    items = [(b"", pb(1, num_shards) + pb(2, int(big_endian)) + pb(3, pb(1, 1)))]
    for name, (dtype, shape, raw, shard, extra) in sorted(entries.items()):
        dims = b"".join(pb(2, pb(1, d)) for d in shape)
        entry = (pb(1, dtype) + pb(2, dims) + pb(3, shard) + pb(4, len(shards[shard])) + pb(5, len(raw))
                 + varint(6 << 3 | 5) + _mask(crc32c(raw)).to_bytes(4, "little") + extra)
        shards[shard] += raw
        items.append((name.encode(), entry))
    for shard, raw in shards.items():
        Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}").write_bytes(raw)

    out = bytearray()

    def append(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        trailer = bytes([compression])
        out.extend(contents + trailer + _mask(crc32c(contents + trailer)).to_bytes(4, "little"))
        return handle

    data_handle = append(_block(items))
    meta_handle = append(_block([]))
    index_handle = append(_block([(items[-1][0] + b"\x00", data_handle)]))
    footer = (meta_handle + index_handle).ljust(40, b"\x00") + _MAGIC.to_bytes(8, "little")
    Path(f"{prefix}.index").write_bytes(bytes(out) + footer)


def write_checkpoint(prefix, tensors: dict[str, np.ndarray]) -> None:
    """Write numpy `tensors` as `prefix.index` + `prefix.data-00000-of-00001`, with a `checkpoint` state file."""
    prefix = Path(prefix)
    entries = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        entries[name] = (DTYPE_ENUM[array.dtype], array.shape, array.tobytes(), 0, b"")
    write_bundle(prefix, entries)
    (prefix.parent / "checkpoint").write_text(f'model_checkpoint_path: "{prefix.name}"\n')
