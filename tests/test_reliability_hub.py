"""hubconf.py: `torch.hub.load(REPO, "efficientdet_dN", source="local", ...)` from another working directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT
from model import VARIANTS, build_model
from utils.weights import save_weights

SCRIPT = """
import json, sys, torch
repo, weights = sys.argv[1], sys.argv[2]
model = torch.hub.load(repo, "efficientdet_d0", source="local", weights=weights)
random = torch.hub.load(repo, "efficientdet_d1", source="local", num_classes=3)
sys.path.insert(0, repo)  # after the loads, which needed no path: only to list the entry points
import hubconf as hub
entries = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
try:
    torch.hub.load(repo, "efficientdet_d7x", source="local", pretrained=True)
    missing = ""
except FileNotFoundError as e:
    missing = str(e).splitlines()[0]
torch.save(model.state_dict(), "loaded.pth")
print(json.dumps({"training": model.training, "class_names": model.class_names, "entries": entries,
                  "d1_classes": random.class_net.predict.conv_pw.bias.numel() // 9,
                  "d1_fpn": random.config.fpn_num_filters,
                  "missing": missing}))
"""


def test_hub_load_from_another_working_directory(tmp_path):
    torch.manual_seed(3)
    trained = build_model("efficientdet-d0", num_classes=4)
    save_weights(tmp_path / "w.pth", trained.state_dict(), model_name="efficientdet-d0", num_classes=4,
                 class_names=["a", "b", "c", "d"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository is not importable from here
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path / "w.pth")], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["entries"] == sorted(name.replace("-", "_") for name in VARIANTS)  # one per variant, no others
    assert result["training"] is False and result["class_names"] == ["a", "b", "c", "d"]
    assert result["d1_classes"] == 3 and result["d1_fpn"] == VARIANTS["efficientdet-d1"].fpn_num_filters
    if not (ROOT / "weights" / "efficientdet-d7x").exists():  # pretrained=True reads weights/<model>.pth
        assert result["missing"].startswith(f"{ROOT / 'weights' / 'efficientdet-d7x.pth'}: pretrained weights not "
                                            f"found")
    loaded = torch.load(elsewhere / "loaded.pth", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())


def test_num_classes_with_weights_is_an_error(tmp_path):
    """The weights set the classes: `num_classes` beside them is a one-line error before any file is read
    (it was silently ignored)."""
    import pytest

    import hubconf
    for source in ({"weights": str(tmp_path / "absent.pth")}, {"pretrained": True},
                   {"weights": str(tmp_path / "absent.pth"), "predictor": True}):
        with pytest.raises(ValueError, match="efficientdet-d0: num_classes=3 is for random initialisation; the "
                                             "weights set the classes"):
            hubconf.efficientdet_d0(num_classes=3, **source)
    assert hubconf.efficientdet_d0(num_classes=3).class_net.predict.conv_pw.bias.numel() == 3 * 9
