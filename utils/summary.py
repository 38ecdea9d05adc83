"""Parameter and multiply-add counts of the variants, computed on the meta device (no memory, no init)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from model import VARIANTS, build_model

# Paper (arXiv:1911.09070, Table 2) FLOPs in billions of multiply-adds at each variant's image size
# (the Lite variants are not in the paper).
PAPER_GFLOPS = {"efficientdet-d0": 2.5, "efficientdet-d1": 6.1, "efficientdet-d2": 11, "efficientdet-d3": 25,
                "efficientdet-d4": 55, "efficientdet-d5": 135, "efficientdet-d6": 226, "efficientdet-d7": 325,
                "efficientdet-d7x": 410}


def forward_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of `model` on a tensor of `input_shape` ([N, 3, H, W]) on the model's device
    (the meta device costs no memory or time): 2 x the multiply-adds of every convolution and matrix product,
    as `torch.utils.flop_counter` counts them at the aten level, so functional convs and folded weights count
    too (module forward hooks on `nn.Conv2d` would miss them). Element-wise ops (BN, activations, fusion) are
    not counted, as in the paper's FLOPs."""
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(input_shape, device=device))
    return counter.get_total_flops()


def variant_summary(name: str, num_classes: int = 90) -> dict:
    """Params and GMACs (conv/matmul multiply-adds, batch 1) of `name` at its official image size."""
    size = VARIANTS[name].image_size
    with torch.device("meta"):
        model = build_model(name, num_classes=num_classes).eval()
    flops = forward_flops(model, (1, 3, *VARIANTS[name].image_hw))
    return {"model": name, "image_size": size, "params": sum(p.numel() for p in model.parameters()),
            "gmacs": flops / 2e9, "paper_gflops": PAPER_GFLOPS.get(name)}


def summary_table(names) -> str:
    lines = [f"{'model':<20}{'image':>6}{'params':>13}{'GMACs':>9}{'paper GFLOPs':>14}"]
    for name in names:
        s = variant_summary(name)
        paper = "-" if s["paper_gflops"] is None else s["paper_gflops"]
        lines.append(f"{name:<20}{s['image_size']:>6}{s['params']:>13,}{s['gmacs']:>9.2f}{paper:>14}")
    return "\n".join(lines)


def add_summary_args(parser) -> None:
    parser.add_argument("-model", default="efficientdet-d0", choices=[*VARIANTS, "all"], help="variant, or all")


def run_summary(args) -> None:
    print(summary_table(list(VARIANTS) if args.model == "all" else [args.model]))
