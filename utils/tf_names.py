"""Map every parameter and BN buffer of our modules to the variable(s) of the official TF checkpoints.

Names follow the released checkpoints (`efficientdet-d*.tar.gz`, `efficientdet-lite*.tgz`, also what the
official Keras and legacy TF1 builds create): see `../shared/fixtures/tf_reference_d0/README.md` and
`tf_reference_lite0/README.md` for the conventions (Lite: no `se/` and no `WSM` variables). The map is
derived from a built module, so it can never disagree with the module structure.
"""
from __future__ import annotations

from torch import nn

from model.bifpn import ResampleFeatureMap
from model.efficientdet import EfficientDet
from model.efficientnet import EfficientNet
from model.head import HeadNet
from model.layers import SeparableConv2d

# torch BN attribute -> TF BN variable
_BN_VARS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}

NameMap = dict[str, "str | list[str]"]  # torch key -> TF name (or names stacked into one tensor)


def _conv(out: NameMap, key: str, conv: nn.Conv2d, tf: str) -> None:
    out[f"{key}.weight"] = f"{tf}/kernel"
    if conv.bias is not None:
        out[f"{key}.bias"] = f"{tf}/bias"


def _bn(out: NameMap, key: str, tf: str) -> None:
    for attr, var in _BN_VARS.items():
        out[f"{key}.{attr}"] = f"{tf}/{var}"


def _separable(out: NameMap, key: str, conv: SeparableConv2d, tf: str) -> None:
    out[f"{key}.conv_dw.weight"] = f"{tf}/depthwise_kernel"
    out[f"{key}.conv_pw.weight"] = f"{tf}/pointwise_kernel"
    if conv.conv_pw.bias is not None:
        out[f"{key}.conv_pw.bias"] = f"{tf}/bias"


def _resample(out: NameMap, key: str, resample: ResampleFeatureMap, tf: str) -> None:
    if resample.project:
        _conv(out, f"{key}.conv", resample.conv, f"{tf}/conv2d")
        _bn(out, f"{key}.bn", f"{tf}/bn")


def backbone_names(backbone: EfficientNet, key: str = "") -> NameMap:
    """Backbone keys (prefixed by `key`) -> `efficientnet-bN/...` (or `efficientnet-liteN/...`) names.

    In a block with expansion the TF layers are numbered in creation order: `conv2d` (expand),
    `conv2d_1` (project), `tpu_batch_normalization{,_1,_2}` (expand, depthwise, project); without
    expansion (B0's first block) `conv2d` is the projection and the BNs are depthwise, project.
    """
    tf = backbone.config.name
    out: NameMap = {}
    _conv(out, f"{key}stem.conv", backbone.stem.conv, f"{tf}/stem/conv2d")
    _bn(out, f"{key}stem.bn", f"{tf}/stem/tpu_batch_normalization")
    for i, block in enumerate(backbone.blocks):
        k, t = f"{key}blocks.{i}", f"{tf}/blocks_{i}"
        bns = iter(f"{t}/tpu_batch_normalization{s}" for s in ("", "_1", "_2"))
        if block.expand:
            _conv(out, f"{k}.conv_expand", block.conv_expand, f"{t}/conv2d")
            _bn(out, f"{k}.bn_expand", next(bns))
        out[f"{k}.conv_dw.weight"] = f"{t}/depthwise_conv2d/depthwise_kernel"
        _bn(out, f"{k}.bn_dw", next(bns))
        if block.se is not None:  # Lite backbones have no SE
            _conv(out, f"{k}.se.conv_reduce", block.se.conv_reduce, f"{t}/se/conv2d")
            _conv(out, f"{k}.se.conv_expand", block.se.conv_expand, f"{t}/se/conv2d_1")
        _conv(out, f"{k}.conv_project", block.conv_project, f"{t}/conv2d_1" if block.expand else f"{t}/conv2d")
        _bn(out, f"{k}.bn_project", next(bns))
    return out


def _head_names(out: NameMap, key: str, head: HeadNet, tf: str, min_level: int) -> None:
    """`class_net/class-{i}`, `class_net/class-{i}-bn-{level}`, `class_net/class-predict` (box alike)."""
    prefix = tf.split("_")[0]  # "class" or "box"
    for i, conv in enumerate(head.convs):
        _separable(out, f"{key}.convs.{i}", conv, f"{tf}/{prefix}-{i}")
        for level in range(len(head.bns[i])):
            _bn(out, f"{key}.bns.{i}.{level}", f"{tf}/{prefix}-{i}-bn-{min_level + level}")
    _separable(out, f"{key}.predict", head.predict, f"{tf}/{prefix}-predict")


def efficientdet_names(model: EfficientDet) -> NameMap:
    """Every key of `model.state_dict()` except BN `num_batches_tracked` -> its TF name(s).

    BiFPN node `k` of a cell was created when `num_levels + k` features existed, which the official
    code puts in its layer names: `resample_{input}_{offset}_{n}` and `op_after_combine{n}`. The
    fast-fusion weights are the scalars `WSM`, `WSM_1`, ... stacked into one tensor.
    """
    cfg = model.config
    out = backbone_names(model.backbone, "backbone.")
    for j, resample in enumerate(model.fpn.extra_levels):
        level = cfg.max_level - len(model.fpn.extra_levels) + 1 + j
        _resample(out, f"fpn.extra_levels.{j}", resample, f"resample_p{level}")
    for c, cell in enumerate(model.fpn.cells):
        for k, (node, offsets) in enumerate(zip(cell.nodes, cell.inputs)):
            key, tf, n = f"fpn.cells.{c}.nodes.{k}", f"fpn_cells/cell_{c}/fnode{k}", cfg.num_levels + k
            for j, (resample, offset) in enumerate(zip(node.resample, offsets)):
                _resample(out, f"{key}.resample.{j}", resample, f"{tf}/resample_{j}_{offset}_{n}")
            if node.edge_weights is not None:
                out[f"{key}.edge_weights"] = [f"{tf}/WSM" + (f"_{j}" if j else "") for j in range(len(offsets))]
            _separable(out, f"{key}.conv", node.conv, f"{tf}/op_after_combine{n}/conv")
            _bn(out, f"{key}.bn", f"{tf}/op_after_combine{n}/bn")
    _head_names(out, "class_net", model.class_net, "class_net", cfg.min_level)
    _head_names(out, "box_net", model.box_net, "box_net", cfg.min_level)
    return out
