"""hubconf.py `pretrained=True`: the entry point resolves the official weights file and returns a model that
carries those weights. The file is a random D0 in the porter's format (90 COCO classes, no class names),
written in tmp_path: nothing is written into, or read from, the repository's weights/ folder."""
from pathlib import Path

import torch

from conftest import ROOT
from data.coco import COCO_CATEGORY_NAMES
from model import build_model
from utils.random_weights import randomise_
from utils.weights import save_weights

WEIGHTS_DIR_ENV = "EFFICIENTDET_WEIGHTS_DIR"  # utils.pretrained's weights folder setting


def _official_like(folder: Path) -> dict:
    """`folder/efficientdet-d0.pth` as `python -m utils.port_tf` writes it, with random weights (BN statistics
    and biases randomised too, so that no entry equals a fresh model's); returns its state dict."""
    torch.manual_seed(7)
    state = randomise_(build_model("efficientdet-d0")).state_dict()
    save_weights(folder / "efficientdet-d0.pth", state, model_name="efficientdet-d0", num_classes=90, ema=True,
                 backbone_only=False, source="random weights in the porter's format (test)")
    return state


def _repo_weights_listing():
    folder = ROOT / "weights"
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) if folder.is_dir() else None


def _assert_carries(model, state):
    assert not model.training and model.config.name == "efficientdet-d0"
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert model.class_names[0] == COCO_CATEGORY_NAMES[1] and len(model.class_names) == 90  # COCO's label space


def test_hub_pretrained_true_returns_the_resolved_weights(tmp_path, monkeypatch):
    """`torch.hub.load(REPO, "efficientdet_d0", source="local", pretrained=True)`, with the weights lookup
    (`utils.pretrained.resolve_pretrained`, as hubconf calls it) pointed at tmp_path instead of weights/."""
    import utils.pretrained
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    state = _official_like(tmp_path)
    real = utils.pretrained.resolve_pretrained
    asked = []

    def resolve_in_tmp(model_name, weights_dir=None, *args, **kwargs):
        asked.append((model_name, weights_dir))
        return real(model_name, tmp_path, *args, **kwargs)
    monkeypatch.setattr(utils.pretrained, "resolve_pretrained", resolve_in_tmp)
    before = _repo_weights_listing()
    model = torch.hub.load(str(ROOT), "efficientdet_d0", source="local", pretrained=True)
    assert len(asked) == 1 and asked[0][0] == "efficientdet-d0"
    assert asked[0][1] is None or Path(asked[0][1]) == ROOT / "weights"  # the repository's folder, by default
    _assert_carries(model, state)
    assert _repo_weights_listing() == before


def test_hub_pretrained_true_reads_the_weights_folder_setting(tmp_path, monkeypatch):
    state = _official_like(tmp_path)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    before = _repo_weights_listing()
    model = torch.hub.load(str(ROOT), "efficientdet_d0", source="local", pretrained=True)
    _assert_carries(model, state)
    assert _repo_weights_listing() == before
