"""Non-trivial random weights for comparing two ways of computing the same network (tests, speed benchmark).

A freshly built model has BN at identity (gamma 1, beta 0, mean 0, variance 1), zero biases and equal fusion
weights: a wrong BN fold or a lost bias would then change nothing visible, and every anchor's score would sit
at the class prior. `randomise_` redraws exactly those one-dimensional tensors; conv kernels keep their
initialisation.
"""
from __future__ import annotations

import torch
from torch import nn

CLASS_BIAS = "class_net.predict.conv_pw.bias"  # the class head's last bias: the focal-loss prior when fresh


def randomise_(model: nn.Module, seed: int = 0, keep_class_prior: bool = False) -> nn.Module:
    """Redraw BN statistics, gammas, betas, biases and fusion weights from `seed`; returns the model in eval mode.

    running_var ~ U(0.5, 2), gammas and fusion weights ~ U(0.5, 1.5), betas, means and biases ~ U(-0.2, 0.2).
    `keep_class_prior`: the class head's bias stays centred on its prior (-4.6 for pi = 0.01), so that, as with
    trained weights, few anchors pass a score threshold (what post-processing costs depends on it).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not (t.is_floating_point() and t.dim() == 1):
                continue
            r = torch.rand(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + 1.5 * r)
            elif name.endswith("weight") or name.endswith("edge_weights"):
                t.copy_(0.5 + r)
            elif keep_class_prior and name == CLASS_BIAS:
                t.add_(0.4 * (r - 0.5))
            else:
                t.copy_(0.4 * (r - 0.5))
    return model.eval()
