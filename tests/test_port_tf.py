"""The TF checkpoint porter: complete, EMA-aware, all-or-nothing, with clear errors on bad input."""
import shutil

import numpy as np
import pytest
import torch

from model import build_model
from tf_writer import write_checkpoint
from utils.port_tf import PortError, load_tf_state_dict, main, port_tf_checkpoint
from utils.tf_checkpoint import CheckpointError, TFCheckpointReader
from utils.weights import load_weights

EMA = "/ExponentialMovingAverage"


@pytest.fixture(scope="module")
def tensors(fixture_dir):
    return TFCheckpointReader(fixture_dir).read_all()


@pytest.fixture(scope="module")
def ema_state(fixture_dir):
    return load_tf_state_dict(fixture_dir, "efficientdet-d0")


def _copy_fixture(fixture_dir, dest):
    dest.mkdir()
    for name in ("checkpoint", "model.index", "model.data-00000-of-00001"):
        shutil.copy(fixture_dir / name, dest / name)
    return dest


def test_cli_writes_complete_weights(fixture_dir, tmp_path, ema_state, capsys):
    out = tmp_path / "weights" / "efficientdet-d0.pth"
    args = ["--model", "efficientdet-d0", "--checkpoint", str(fixture_dir / "model"), "--output", str(out)]
    assert main(args) == 0
    assert "EMA weights, 90 classes" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind
    state, meta = load_weights(out)
    assert meta["model_name"] == "efficientdet-d0" and meta["num_classes"] == 90 and meta["ema"] is True
    build_model("efficientdet-d0").load_state_dict(state)  # strict: every key, every shape
    assert state.keys() == ema_state.keys()
    assert all(torch.equal(state[k], ema_state[k]) for k in state)  # prefix path == folder path


def test_ema_shadows_are_used_by_default(tensors, ema_state):
    key, tf = "class_net.predict.conv_pw.bias", "class_net/class-predict/bias"
    assert np.array_equal(ema_state[key].numpy(), tensors[tf + EMA])
    assert not np.array_equal(ema_state[key].numpy(), tensors[tf])


def test_no_ema_uses_raw_values(fixture_dir, tensors):
    state = load_tf_state_dict(fixture_dir, "efficientdet-d0", ema=False)
    conv = tensors["efficientnet-b0/stem/conv2d/kernel"]  # HWIO -> OIHW
    assert np.array_equal(state["backbone.stem.conv.weight"].numpy(), conv.transpose(3, 2, 0, 1))
    wsm = [tensors[f"fpn_cells/cell_1/fnode4/WSM{s}"] for s in ("", "_1", "_2")]
    assert np.array_equal(state["fpn.cells.1.nodes.4.edge_weights"].numpy(), np.stack(wsm))


def test_checkpoint_without_shadows_falls_back_to_raw(tensors, tmp_path):
    write_checkpoint(tmp_path / "model", {k: v for k, v in tensors.items() if not k.endswith(EMA)})
    result = port_tf_checkpoint(tmp_path, "efficientdet-d0")
    assert result.ema is False
    key = "box_net.predict.conv_pw.bias"
    assert np.array_equal(result.state_dict[key].numpy(), tensors["box_net/box-predict/bias"])


def test_wrong_variant_is_named(fixture_dir):
    with pytest.raises(PortError, match=r"checkpoint has backbone efficientnet-b0, efficientdet-d1 expects "
                                        r"efficientnet-b1; checkpoint has fpn width 64, efficientdet-d1 expects 88"
                                        r".*: is this efficientdet-d0\?"):
        port_tf_checkpoint(fixture_dir, "efficientdet-d1")


def test_missing_variable(tensors, tmp_path):
    edited = {k: v for k, v in tensors.items() if not k.startswith("box_net/box-predict/bias")}
    write_checkpoint(tmp_path / "model", edited)
    with pytest.raises(PortError, match=r"1 variable\(s\) missing from the checkpoint: box_net/box-predict/bias"):
        port_tf_checkpoint(tmp_path, "efficientdet-d0")


def test_unused_variable(tensors, tmp_path):
    write_checkpoint(tmp_path / "model", {**tensors, "class_net/class-9/bias": np.zeros(64, np.float32)})
    with pytest.raises(PortError, match=r"1 checkpoint variable\(s\) not used by efficientdet-d0: "
                                        r"class_net/class-9/bias"):
        port_tf_checkpoint(tmp_path, "efficientdet-d0")


def test_shape_mismatch(tensors, tmp_path):
    name = "fpn_cells/cell_2/fnode7/op_after_combine12/conv/bias"
    write_checkpoint(tmp_path / "model", {**tensors, name: np.zeros(65, np.float32),
                                          name + EMA: np.zeros(65, np.float32)})
    with pytest.raises(PortError, match=r"1 shape mismatch\(es\): .*op_after_combine12/conv/bias \(65,\) -> "
                                        r"fpn.cells.2.nodes.7.conv.conv_pw.bias expects \(64,\)"):
        port_tf_checkpoint(tmp_path, "efficientdet-d0")


def test_missing_index(fixture_dir, tmp_path):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt")
    (folder / "model.index").unlink()
    with pytest.raises(CheckpointError, match=r"names checkpoint 'model', but .*model.index does not exist"):
        port_tf_checkpoint(folder, "efficientdet-d0")


def test_truncated_data_file_cli(fixture_dir, tmp_path, capsys):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt")
    data = folder / "model.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1_000_000])
    out = tmp_path / "out.pth"
    assert main(["--model", "efficientdet-d0", "--checkpoint", str(folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data shard is truncated" in err.splitlines()[0]
    assert not out.exists()


def test_corrupt_data_file(fixture_dir, tmp_path):
    folder = _copy_fixture(fixture_dir, tmp_path / "ckpt")
    data = folder / "model.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails its CRC32C check: the file is corrupt"):
        port_tf_checkpoint(folder, "efficientdet-d0")


def test_backbone_only_checkpoint(tensors, ema_state, tmp_path):
    # An ImageNet EfficientNet checkpoint: backbone variables plus a classifier head the detector ignores.
    backbone = {k: v for k, v in tensors.items() if k.startswith("efficientnet-b0/")}
    head = {"efficientnet-b0/head/conv2d/kernel": np.zeros((1, 1, 320, 1280), np.float32),
            "efficientnet-b0/head/dense/kernel": np.zeros((1280, 1000), np.float32),
            "global_step": np.array(5, np.int64)}
    write_checkpoint(tmp_path / "model", {**backbone, **head})
    with pytest.raises(PortError, match="has only backbone variables .* use --backbone-only"):
        port_tf_checkpoint(tmp_path, "efficientdet-d0")
    with pytest.raises(PortError, match="efficientdet-d2 expects efficientnet-b2: is this efficientdet-d0\\?"):
        port_tf_checkpoint(tmp_path, "efficientdet-d2", backbone_only=True)
    state = load_tf_state_dict(tmp_path, "efficientdet-d0", backbone_only=True)
    model = build_model("efficientdet-d0")
    model.backbone.load_state_dict(state)  # strict
    for key, value in state.items():
        assert torch.equal(value, ema_state["backbone." + key]), key
