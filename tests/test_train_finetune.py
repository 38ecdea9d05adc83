"""Fine-tuning and multi-process details: --freeze, --keep, and a DDP step equal to one process with the whole batch.

Run as a script under `torch.distributed.run` this file is the worker of the 2-process test (see `_ddp_worker`).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from data.coco import collate_detection  # noqa: E402
from data.shapes import make_shapes_dataset  # noqa: E402
from train.distributed import all_mean  # noqa: E402
from train.ema import unwrap_model  # noqa: E402
from train.keep_best import keep_best, kept_checkpoints  # noqa: E402
from model import build_model  # noqa: E402
from model_helpers import free_port  # noqa: E402
from train.step import LOSS_TERMS  # noqa: E402
from train.trainer import Trainer  # noqa: E402
from utils.weights import save_weights  # noqa: E402

HALF_BATCH = 2  # per process in the 2-process run; the single process takes 2 x HALF_BATCH


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, workers=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weights of a 5-class D0 to start from (frozen parts must not keep a random initialisation)."""
    path = tmp_path_factory.mktemp("weights") / "d0.pth"
    torch.manual_seed(3)
    save_weights(path, build_model("efficientdet-d0", num_classes=5).state_dict(), model_name="efficientdet-d0",
                 num_classes=5)
    return path


def _args(shapes, output, *extra, mode="train", batch_size=2):
    return main.parse_args(["-mode", mode, "--data", str(shapes), "--image-size", "128", "--batch-size",
                            str(batch_size), "--epochs", "2", "--workers", "0", "--log-every", "1",
                            "--output", str(output), "--device", "cpu", *extra])


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bn_modes(module):
    return {m.training for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)}


@pytest.mark.parametrize("freeze, frozen, trained", [("backbone", ("backbone",), ("fpn", "class_net", "box_net")),
                                                     ("backbone+fpn", ("backbone", "fpn"), ("class_net", "box_net"))])
def test_freeze_trains_only_the_rest_and_keeps_frozen_bn_statistics(shapes, weights, tmp_path, freeze, frozen,
                                                                    trained):
    trainer = Trainer(_args(shapes, tmp_path / "ft", "--freeze", freeze, "--weights", str(weights)))
    model = trainer.model
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name in frozen:
        part = getattr(model, name)
        assert not any(p.requires_grad or id(p) in optimised for p in part.parameters())
    for name in trained:
        assert all(p.requires_grad and id(p) in optimised for p in getattr(model, name).parameters())
    before = {name: _snapshot(getattr(model, name)) for name in frozen + trained}
    model.train()  # as any caller may: frozen BN stays in eval mode, the rest trains
    assert all(_bn_modes(getattr(model, name)) == {False} for name in frozen)
    assert all(_bn_modes(getattr(model, name)) == {True} for name in trained)
    trainer.fit(max_steps=1)
    model.train()
    for name in frozen:
        after = getattr(model, name).state_dict()  # weights and BN running statistics, untouched
        assert all(torch.equal(before[name][k], after[k]) for k in after), name
        assert _bn_modes(getattr(model, name)) == {False}
        ema_part = getattr(trainer.ema.module, name).state_dict()
        assert all(torch.equal(before[name][k], ema_part[k]) for k in ema_part), name
    for name in trained:
        after = getattr(model, name).state_dict()
        changed = [k for k in after if not torch.equal(before[name][k], after[k])]
        assert any(k.endswith("running_mean") for k in changed), name
        assert any(k.endswith("weight") for k in changed), name


def test_freeze_needs_trained_weights_to_start_from(shapes, tmp_path):
    with pytest.raises(ValueError, match=r"^--freeze backbone\+fpn: the frozen part would keep its random "
                                         r"initialisation; start from trained weights \(--pretrained, --weights\)$"):
        Trainer(_args(shapes, tmp_path / "run", "--freeze", "backbone+fpn", "--backbone-weights", "b.pth"))
    assert not (tmp_path / "run").exists()  # said before any work
    with pytest.raises(ValueError, match=r"or --backbone-weights\)$"):
        Trainer(_args(shapes, tmp_path / "run", "--freeze", "backbone"))


def test_backbone_weights_start_the_backbone_only(shapes, weights, tmp_path, capsys):
    """`--backbone-weights` takes the backbone of a file (a ported EfficientNet or a whole detector) and
    leaves the BiFPN and heads at their fresh initialisation."""
    source = build_model("efficientdet-d0", num_classes=5)
    source.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    trainer = Trainer(_args(shapes, tmp_path / "run", "--backbone-weights", str(weights)))
    assert f"backbone initialised from {weights}" in capsys.readouterr().out
    mine, theirs = trainer.model.state_dict(), source.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs if k.startswith("backbone."))
    fpn_weight = "fpn.cells.0.nodes.0.conv.conv_pw.weight"
    assert not torch.equal(mine[fpn_weight], theirs[fpn_weight])


def test_resume_refuses_another_freeze(shapes, weights, tmp_path):
    Trainer(_args(shapes, tmp_path / "plain")).save_last()  # a run folder at step 0
    with pytest.raises(ValueError, match=r"started with other flags: --freeze None -> backbone"):
        Trainer(_args(shapes, tmp_path / "plain", "--resume", "--freeze", "backbone"))
    Trainer(_args(shapes, tmp_path / "frozen", "--freeze", "backbone", "--weights", str(weights))).save_last()
    with pytest.raises(ValueError, match=r"--freeze backbone -> backbone\+fpn"):
        Trainer(_args(shapes, tmp_path / "frozen", "--resume", "--freeze", "backbone+fpn"))
    with pytest.raises(ValueError, match=r"--freeze backbone -> None"):
        Trainer(_args(shapes, tmp_path / "frozen", "--resume"))
    resumed = Trainer(_args(shapes, tmp_path / "frozen", "--resume", "--freeze", "backbone"))
    assert not any(p.requires_grad for p in resumed.model.backbone.parameters())


def test_keep_n_best_checkpoints_by_ap(tmp_path):
    def names():
        return sorted(k.path.name for k in kept_checkpoints(tmp_path))

    for epoch, ap in [(1, 0.10), (2, 0.30), (3, 0.20), (4, 0.05), (5, 0.30), (6, 0.30), (7, 0.40)]:
        written = keep_best(tmp_path, {"epoch": epoch}, epoch, ap, keep=2)
        assert (written is not None) == (epoch not in (4, 6))  # epoch 6 ties epochs 2 and 5: the earlier stay
        if written:
            assert torch.load(written, weights_only=True) == {"epoch": epoch}
    assert names() == ["best-epoch2-ap0.3000.pth", "best-epoch7-ap0.4000.pth"]
    # A resumed run that evaluates epoch 7 again replaces its file, whatever AP it gets now.
    keep_best(tmp_path, {"epoch": 7}, 7, 0.25, keep=2)
    assert names() == ["best-epoch2-ap0.3000.pth", "best-epoch7-ap0.2500.pth"]
    (tmp_path / "best.pth").write_bytes(b"x")  # files of other names are never touched
    keep_best(tmp_path, {"epoch": 8}, 8, 0.9, keep=1)
    assert names() == ["best-epoch8-ap0.9000.pth"] and (tmp_path / "best.pth").exists()


def _batch(trainer, count):
    """The first `count` training items (deterministic augmentation draws), collated."""
    images, t = collate_detection([trainer.train_set[i] for i in range(count)])
    return images, t["gt_boxes"], t["gt_classes"]


def _loss_and_grads(trainer, images, gt_boxes, gt_classes):
    """Loss terms of the global batch and the gradients of one `forward_losses` + backward (no optimiser step).

    BN runs on its running statistics (eval mode, no drop-connect either): the batch statistics of two halves
    differ from those of the whole batch, by design of per-process BN, and that is not what is tested here.
    """
    trainer.model.eval()
    losses = trainer.forward_losses(images, gt_boxes, gt_classes)
    losses["loss"].backward()
    terms = all_mean(torch.stack([losses[k].detach() for k in LOSS_TERMS]), trainer.dist)
    model = unwrap_model(trainer.model)
    return terms, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(shapes, output, result):
    trainer = Trainer(_args(shapes, output, batch_size=HALF_BATCH))
    images, gt_boxes, gt_classes = _batch(trainer, 2 * HALF_BATCH)
    mine = slice(trainer.dist.rank * HALF_BATCH, (trainer.dist.rank + 1) * HALF_BATCH)
    terms, grads = _loss_and_grads(trainer, images[mine], gt_boxes[mine], gt_classes[mine])
    if trainer.dist.is_main:
        torch.save({"terms": terms, "grads": grads}, result)
    torch.distributed.destroy_process_group()


def test_two_processes_of_batch_b_step_as_one_process_of_batch_2b(shapes, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), __file__, str(shapes), str(tmp_path / "ddp"), str(tmp_path / "ddp.pt")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    trainer = Trainer(_args(shapes, tmp_path / "one", batch_size=2 * HALF_BATCH))
    images, gt_boxes, gt_classes = _batch(trainer, 2 * HALF_BATCH)
    halves = [trainer.assigner(gt_boxes[i:i + HALF_BATCH], gt_classes[i:i + HALF_BATCH]).num_positives
              for i in (0, HALF_BATCH)]
    assert halves[0] != halves[1]  # else per-process normalisation would give the same result: no test
    terms, grads = _loss_and_grads(trainer, images, gt_boxes, gt_classes)

    torch.testing.assert_close(ddp["terms"], terms, rtol=1e-4, atol=0)  # per-process normalisers: 8% off
    assert sorted(ddp["grads"]) == sorted(grads) and len(grads) > 100
    for name, grad in grads.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert (ddp["grads"][name] - grad).abs().max() <= 1e-3 * scale, name  # measured <= 3e-5 (else ~1)


if __name__ == "__main__":
    _ddp_worker(*sys.argv[1:4])
