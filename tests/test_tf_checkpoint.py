"""Tests for utils/tf_checkpoint.py: the real fixture checkpoint, CRC32C, corrupt inputs,
and small synthetic bundles (written below) for dtypes and unsupported features."""

import json
import os
import shutil

import numpy as np
import pytest

from tf_writer import pb, write_bundle
from utils.tf_checkpoint import CheckpointError, TFCheckpointReader, crc32c, resolve_checkpoint_prefix

SHARD = "model.data-00000-of-00001"


@pytest.fixture(scope="module")
def reader(fixture_dir):
    return TFCheckpointReader(fixture_dir)


def _official_entries(folder):
    """name -> (shape, dtype) from official_variable_names.txt."""
    entries = {}
    for line in (folder / "official_variable_names.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, dtype = line.split("\t")
            entries[name] = (tuple(json.loads(shape)), np.dtype(dtype))
    return entries


def _copy_fixture(folder, dst, data="link"):
    """Copy checkpoint + index into dst; the shard is symlinked, copied, or left out (data=None)."""
    dst.mkdir(exist_ok=True)
    for name in ("checkpoint", "model.index"):
        shutil.copyfile(folder / name, dst / name)
    if data == "link":
        os.symlink(folder / SHARD, dst / SHARD)
    elif data == "copy":
        shutil.copyfile(folder / SHARD, dst / SHARD)
    return dst


def _flip_byte(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------ the real checkpoint
def test_names_shapes_dtypes_match_official_list(fixture_dir, reader):
    official = _official_entries(fixture_dir)
    assert len(official) == 1419
    assert reader.names() == sorted(official)
    assert len(reader) == 1419
    for name, (shape, dtype) in official.items():
        assert name in reader
        assert reader.shape(name) == shape, name
        assert reader.dtype(name) == dtype, name
    assert "nope" not in reader


def test_read_values(reader):
    step = reader.read("global_step")
    assert step.dtype == np.int64 and step.shape == () and int(step) == 10000
    kernel = reader.read("class_net/class-predict/pointwise_kernel/ExponentialMovingAverage")
    assert kernel.shape == reader.shape("class_net/class-predict/pointwise_kernel") == (1, 1, 64, 810)
    assert kernel.dtype == np.float32 and np.isfinite(kernel).all() and kernel.std() > 0
    kernel[...] = 0  # an independent, writable copy
    assert reader.read("class_net/class-predict/pointwise_kernel/ExponentialMovingAverage").std() > 0


def test_read_all_verifies_every_tensor(reader):
    tensors = reader.read_all()
    assert list(tensors) == reader.names()
    assert all(tensors[n].shape == reader.shape(n) for n in tensors)


def test_resolve_prefix_variants(fixture_dir, tmp_path):
    prefix = str(fixture_dir / "model")
    for path in (fixture_dir, str(fixture_dir), prefix, prefix + ".index", fixture_dir / SHARD):
        assert resolve_checkpoint_prefix(path) == prefix
    assert TFCheckpointReader(prefix + ".index").prefix == prefix
    # Folder without a state file but with exactly one .index; and a stale absolute path.
    no_state = _copy_fixture(fixture_dir, tmp_path / "no_state")
    (no_state / "checkpoint").unlink()
    assert resolve_checkpoint_prefix(no_state) == str(no_state / "model")
    moved = _copy_fixture(fixture_dir, tmp_path / "moved")
    (moved / "checkpoint").write_text('model_checkpoint_path: "/gone/elsewhere/model"\n')
    assert resolve_checkpoint_prefix(moved) == str(moved / "model")


def test_unknown_name_suggests_close_names(reader):
    with pytest.raises(CheckpointError, match="model.index: no tensor named 'global_stepp'.*'global_step'"):
        reader.read("global_stepp")


# ------------------------------------------------------------------ CRC32C
def _reference_crc32c(data):
    """Bit-at-a-time table construction, byte-at-a-time update."""
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (0x82F63B78 & -(n & 1))
        table.append(n)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(b"") == 0


@pytest.mark.parametrize("length", [0, 1, 2, 3, 63, 64, 65, 1023, 1024, 1025, 1040, 4095, 4096,
                                    4097, 65536 + 7, 100003, 262144 - 1, 262144 + 13])
def test_crc32c_matches_byte_loop(length):
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    assert crc32c(data) == _reference_crc32c(data)
    assert crc32c(np.frombuffer(data, np.uint8)) == crc32c(bytearray(data)) == crc32c(data)


# ------------------------------------------------------------------ corrupt / missing inputs
def test_missing_index(fixture_dir, tmp_path):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt")
    (folder / "model.index").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint: names checkpoint 'model', but .*model\.index does not exist"):
        TFCheckpointReader(folder)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        TFCheckpointReader(folder / "model")


@pytest.mark.parametrize("keep, message", [(0.5, "bad table magic number"), (10, "too short")])
def test_truncated_index(fixture_dir, tmp_path, keep, message):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt")
    index = folder / "model.index"
    raw = index.read_bytes()
    index.write_bytes(raw[:int(len(raw) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=f"model.index: bad checkpoint index: .*{message}"):
        TFCheckpointReader(folder)


def test_flipped_byte_in_index_block(fixture_dir, tmp_path):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt")
    _flip_byte(folder / "model.index", 1000)
    with pytest.raises(CheckpointError, match="model.index: bad checkpoint index: block at offset 0 fails its CRC32C check"):
        TFCheckpointReader(folder)


def test_missing_data_shard(fixture_dir, tmp_path):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt", data=None)
    with pytest.raises(CheckpointError, match=f"{SHARD}: data shard is missing .*tensor '"):
        TFCheckpointReader(folder)


def test_truncated_data_shard(fixture_dir, tmp_path):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt", data=None)
    (folder / SHARD).write_bytes((fixture_dir / SHARD).read_bytes()[:1_000_000])
    with pytest.raises(CheckpointError, match=f"{SHARD}: data shard is truncated: it has 1000000 bytes but tensor '[^']+' ends"):
        TFCheckpointReader(folder)


def test_data_shard_truncated_after_opening(fixture_dir, tmp_path):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt", data="copy")
    reader = TFCheckpointReader(folder)
    os.truncate(folder / SHARD, 1000)
    with pytest.raises(CheckpointError, match=f"{SHARD}: tensor 'global_step' is truncated"):
        reader.read("global_step")


def test_flipped_byte_in_data_shard(fixture_dir, tmp_path, reader):
    name = "class_net/class-predict/bias/ExponentialMovingAverage"
    good = reader.read(name)
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt", data="copy")
    offset = (folder / SHARD).read_bytes().find(good.tobytes())
    assert offset >= 0
    _flip_byte(folder / SHARD, offset + 5)
    corrupt = TFCheckpointReader(folder)
    np.testing.assert_array_equal(corrupt.read("global_step"), 10000)  # other tensors still read
    message = f"{SHARD}: tensor '{name}' fails its CRC32C check: the file is corrupt"
    with pytest.raises(CheckpointError, match=message):
        corrupt.read(name)
    with pytest.raises(CheckpointError, match=message):
        corrupt.read_all()
    unchecked = TFCheckpointReader(folder, verify_crc=False).read(name)
    assert (unchecked != good).sum() == 1


def test_folder_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="expected a 'checkpoint' state file or exactly one.*found \\*.index: none"):
        TFCheckpointReader(tmp_path)
    (tmp_path / "a.index").write_bytes(b"")
    (tmp_path / "b.index").write_bytes(b"")
    with pytest.raises(CheckpointError, match="found \\*.index: a.index, b.index"):
        resolve_checkpoint_prefix(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resolve_checkpoint_prefix(tmp_path / "missing")


# ------------------------------------------------------------------ synthetic bundles
@pytest.mark.parametrize("big_endian", [False, True])
def test_synthetic_dtypes_endianness_and_shards(tmp_path, big_endian):
    order = ">" if big_endian else "<"
    arrays = {"f16": (19, np.arange(6, dtype=np.float16).reshape(2, 3)),
              "f64": (2, np.linspace(-1, 1, 5)), "i8": (6, np.arange(-3, 3, dtype=np.int8)),
              "u16": (17, np.array([1, 65535], np.uint16)), "b": (10, np.array([True, False])),
              "c64": (8, np.array([1 + 2j], np.complex64)), "u64": (23, np.array([2**64 - 1], np.uint64)),
              "empty": (1, np.zeros((0, 4), np.float32))}
    tensors = {name: (dt, a.shape, a.astype(a.dtype.newbyteorder(order)).tobytes(), i % 2, b"")
               for i, (name, (dt, a)) in enumerate(arrays.items())}
    bf16 = np.array([1.5, -2.0, 3.140625], np.float32)
    tensors["bf16"] = (14, (3,), (bf16.view(np.uint32) >> 16).astype(order + "u2").tobytes(), 1, b"")
    write_bundle(tmp_path / "m", tensors, big_endian=big_endian, num_shards=2)
    reader = TFCheckpointReader(tmp_path)
    assert reader.names() == sorted(tensors)
    for name, (_, expected) in arrays.items():
        got = reader.read(name)
        assert got.dtype == expected.dtype == reader.dtype(name) and got.dtype.isnative
        np.testing.assert_array_equal(got, expected)
    assert reader.dtype("bf16") == np.float32
    np.testing.assert_array_equal(reader.read("bf16"), bf16)


def test_synthetic_unsupported_entries(tmp_path):
    tensors = {"s": (7, (1,), b"\x03abc", 0, b""),
               "part": (1, (4,), b"", 0, pb(7, pb(1, pb(1, 0) + pb(2, 4))))}
    write_bundle(tmp_path / "m", tensors)
    reader = TFCheckpointReader(tmp_path / "m")
    assert reader.names() == ["part", "s"] and reader.shape("part") == (4,)
    with pytest.raises(CheckpointError, match="tensor 's' has unsupported dtype DT_STRING"):
        reader.read("s")
    with pytest.raises(CheckpointError, match="tensor 'part' is a partitioned"):
        reader.read("part")


def test_synthetic_snappy_index_is_rejected(tmp_path):
    write_bundle(tmp_path / "m", {"x": (1, (), b"\0\0\0\0", 0, b"")}, compression=1)
    with pytest.raises(CheckpointError, match="m.index: bad checkpoint index: .*uses snappy compression, which is unsupported"):
        TFCheckpointReader(tmp_path)
