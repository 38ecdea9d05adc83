"""Output-for-output parity with the official TF EfficientDet-D0 (../shared/fixtures/tf_reference_d0).

The fixture's checkpoint is ported with our numpy-only porter; the reference tensors were produced by the
official TF code from the same checkpoint (EMA weights) and image. The tensors and the checks are those of
`python -m parity.tf_parity` (`parity/inference.py`); each tensor's max |delta| goes to the end-of-run report.
"""
import numpy as np
import pytest

from conftest import record_delta
from parity.checks import read_meta
from parity.inference import ANCHOR_TOL, NET_TOL, family_check, network_pairs


@pytest.fixture(scope="module")
def pairs(fixture_dir):
    return network_pairs(fixture_dir, read_meta(fixture_dir))


def _assert_family(pairs, family, tol=NET_TOL):
    for name, ours, ref in pairs[family]:
        record_delta(name, ours, ref, tol)
    check = family_check(pairs[family], family)
    assert check["tol"] == tol and check["ok"], (family, check)


def test_backbone_endpoints(pairs):
    assert [name for name, _, _ in pairs["backbone_features"]] == ["backbone_c3", "backbone_c4", "backbone_c5"]
    _assert_family(pairs, "backbone_features")


def test_extra_levels_and_bifpn(pairs):
    assert len(pairs["fpn_features"]) == 7  # P6 / P7 inputs, BiFPN outputs P3..P7
    _assert_family(pairs, "fpn_features")


def test_head_outputs(pairs):
    assert len(pairs["class_outputs"]) == 5 and len(pairs["box_outputs"]) == 5
    _assert_family(pairs, "class_outputs")
    _assert_family(pairs, "box_outputs")


def test_raw_weights_match_no_ema_outputs(pairs):
    _assert_family(pairs, "no_ema_outputs")
    # The two ports really differ: the EMA model is far from the raw-weight reference.
    ema_p7 = dict((name, ours) for name, ours, _ in pairs["class_outputs"])["class_outputs_p7"]
    raw_p7 = dict((name, ref) for name, _, ref in pairs["no_ema_outputs"])["no_ema class_outputs_p7"]
    assert np.abs(ema_p7 - raw_p7).max() > 1.0


def test_anchors(pairs):
    (_, anchors, _), = pairs["anchors"]
    assert anchors.shape == (49104, 4)
    _assert_family(pairs, "anchors", ANCHOR_TOL)
