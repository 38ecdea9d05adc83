"""Model helpers shared by the test files: non-trivial weights and inputs for comparing two ways of
computing the same network, a tiny dataset and its weights, a free port for two-process runs."""
import socket
from pathlib import Path

import torch

from data.coco import CocoDetection
from data.shapes import make_shapes_dataset
from model import build_model
from utils.random_weights import randomise_
from utils.weights import save_weights


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call, for a two-process rendezvous: a fixed port
    collides when two test runs (or two tests) share the machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_head_delta(outputs, expected) -> float:
    """Max |a - b| over all head outputs of two `(cls_outs, box_outs)` pairs of the same shapes."""
    pairs = list(zip(outputs[0] + outputs[1], expected[0] + expected[1]))
    assert all(a.shape == b.shape for a, b in pairs)
    return max(float((a.float() - b).abs().max()) for a, b in pairs)


def photo_like(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Normalised images with a photo's spatial correlation, letterboxed: the bottom third is the constant
    padding every non-square photo gets (`data/transforms.py`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.randn(n, 3, height // 16 + 1, width // 16 + 1, generator=g),
                                        size=(height, width), mode="bicubic", align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, height, width, generator=g)
    x[:, :, 2 * height // 3:] = 0.0
    return x


def realistic_(model: torch.nn.Module, seed: int = 0, size: int = 256) -> torch.nn.Module:
    """Weights as a trained network has them: BN gammas 0.5-2.5 and betas / biases -1..2 (so activations
    carry the large positive means of swish features), then BN running statistics measured on photo-like
    images (so every layer sees normalised inputs, unlike `randomise_`'s near-trivial statistics).

    On such a model the fused path's errors show as they do on real checkpoints: an SE mean accumulated
    pixel by pixel drifts over the letterbox padding by ~1e-3 (see `test_realistic_check_catches_sloppy_mean`).
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.dim() == 1:
                r = torch.rand(t.shape, generator=g)
                t.copy_(0.5 + r if name.endswith("edge_weights")
                        else 0.5 + 2.0 * r if name.endswith("weight") else 3.0 * r - 1.0)
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average of the batch statistics
        model.train()
        for i in range(2):
            model(photo_like(2, size, size, seed + 1 + i))
    for bn in bns:
        bn.momentum = 0.01
    return model.eval()


def tiny_shapes_run(folder: Path, randomised: bool) -> tuple[Path, Path]:
    """A 6-image shapes dataset in `folder/shapes` (2 train, 6 val) and a D0 weight file `folder/w.pth` for its
    classes at 128 px, as training writes it: fresh weights (seed 0), or with `randomise_`'s BN and biases.
    Returns `(dataset root, weight file)`."""
    root = make_shapes_dataset(folder / "shapes", num_train=2, num_val=6, workers=1)
    val = CocoDetection.from_root(root, "val", image_size=128)
    torch.manual_seed(0)
    model = build_model("efficientdet-d0", num_classes=val.num_classes)
    if randomised:
        randomise_(model)
    weights = folder / "w.pth"
    save_weights(weights, model.state_dict(), model_name="efficientdet-d0", num_classes=val.num_classes,
                 class_names=val.class_names, class_to_category=val.class_to_category, image_size=128)
    return root, weights
