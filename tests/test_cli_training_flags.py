"""Training flags as the command line gives them, through `main.parse_args` into the `Trainer`: `--amp` (bf16
autocast on CPU, its checkpoint and resume), the default learning rate and warm-up, `--clip-norm`,
`--weight-decay`, `--ema-decay`, `--label-smoothing`, `--assigner atss`, `--sync-bn`, and `--pretrained` from
the weights folder setting.

The objects the flags configure (optimiser, schedule, EMA, assigner, loss call) are inspected in-process and
driven by hand (one optimiser step on set gradients, one forward) rather than by long training runs."""
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

import main
from data.shapes import make_shapes_dataset
from model import AnchorGenerator, build_model
from model.cpu import unsupported_precision
from train.assign import TargetAssigner
from train.loss import detection_loss
from train.optim import CosineLrSchedule
from train.trainer import Trainer
from utils.weights import load_pth, save_weights

SIZE = 64  # the smallest sizes train fastest; D0 accepts any multiple of 8 here
GT_BOXES = torch.tensor([[[4.0, 6.0, 40.0, 30.0], [20.0, 24.0, 60.0, 62.0]],
                         [[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 0.0, 0.0]]])  # yxyx px, second row of image 2 padding
GT_CLASSES = torch.tensor([[0, 3], [2, -1]])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny inputs, one thread


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, workers=1)


def _args(shapes, output, *extra, batch_size=2, epochs=20):
    """8 training images: 4 steps per epoch at batch 2."""
    return main.parse_args(["-mode", "train", "--data", str(shapes), "--image-size", str(SIZE), "--batch-size",
                            str(batch_size), "--epochs", str(epochs), "--workers", "0", "--log-every", "1",
                            "--output", str(output), "--device", "cpu", *extra])


def _images(seed=0):
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _seeded_losses(trainer):
    """`forward_losses` of a fixed batch, drop-connect seeded alike for every call."""
    torch.manual_seed(123)
    with torch.no_grad():
        return {k: float(v) for k, v in trainer.forward_losses(_images(), GT_BOXES, GT_CLASSES).items()}


def _train_records(output):
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["cls_loss"], r["box_loss"], r["lr"]) for r in lines if r["type"] == "train"}


def _require_bf16():
    reason = unsupported_precision("bf16")
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------- --amp
def test_amp_runs_the_network_under_bf16_autocast_and_saves_a_disabled_scaler(shapes, tmp_path):
    """On CPU --amp is bf16 autocast without a GradScaler: the class head's outputs are bf16 (fp32 without the
    flag), the loss differs from fp32's only by bf16 rounding, and the checkpoint records the flag with an
    empty (disabled) scaler state; resuming such a run without --amp is refused."""
    _require_bf16()
    fp32 = Trainer(_args(shapes, tmp_path / "fp32"))
    amp = Trainer(_args(shapes, tmp_path / "amp", "--amp"))
    assert not amp.scaler.is_enabled()
    assert torch.equal(fp32.model.backbone.stem.conv.weight, amp.model.backbone.stem.conv.weight)  # same init
    seen = []
    for trainer in (fp32, amp):
        trainer.model.class_net.register_forward_hook(lambda module, inputs, outputs: seen.append(outputs[0].dtype))
    plain, again, mixed = _seeded_losses(fp32), _seeded_losses(fp32), _seeded_losses(amp)
    assert seen == [torch.float32, torch.float32, torch.bfloat16]
    assert plain == again  # fp32 is repeatable: what differs below is the autocast
    # bf16 rounding only, bounded as the precision tests bound it (32 roundoffs, tests/precision_helpers.py;
    # the official fixture's bf16 AMP step is 5e-2 from exact on cls_loss): not a CPU's rounding details
    assert mixed["loss"] != plain["loss"] and mixed["loss"] == pytest.approx(plain["loss"], rel=32 * 2.0 ** -8)

    assert amp.train_step(_images(), GT_BOXES, GT_CLASSES) is not None and seen[-1] == torch.bfloat16
    amp.save_last()
    ckpt = load_pth(tmp_path / "amp" / "last.pth")
    assert ckpt["config"]["amp"] is True and ckpt["scaler"] == {}
    with pytest.raises(ValueError, match=r"--amp True -> False"):
        Trainer(_args(shapes, tmp_path / "amp", "--resume"))


def test_amp_resume_restores_the_grad_scaler_and_gives_the_same_losses(shapes, tmp_path, monkeypatch):
    """The GradScaler state the trainer saves is the one it restores. CUDA fp16 is the path that enables the
    scaler; here an enabled CPU GradScaler stands in for it (starting at 2^8, doubling after every step),
    with the real bf16 autocast: a 2-step run cut after its first step and resumed has the scale of the
    uninterrupted run at each point and the same losses and weights."""
    _require_bf16()
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: real_scaler(
        "cpu", init_scale=2.0 ** 8, growth_interval=1))

    def args(output, *extra):
        return _args(shapes, output, "--amp", *extra, epochs=0.5)  # 2 steps

    full = Trainer(args(tmp_path / "full"))
    assert full.scaler.is_enabled()
    full.fit()
    assert full.scaler.get_scale() == 2.0 ** 10  # 2 steps without an overflow
    Trainer(args(tmp_path / "cut")).fit(max_steps=1)
    saved = load_pth(tmp_path / "cut" / "last.pth")["scaler"]
    assert saved["scale"] == 2.0 ** 9 and saved["growth_interval"] == 1
    resumed = Trainer(args(tmp_path / "cut", "--resume"))
    assert resumed.scaler.state_dict() == saved  # not a fresh 2^8
    resumed.fit()
    assert resumed.scaler.get_scale() == full.scaler.get_scale()
    assert _train_records(tmp_path / "cut") == _train_records(tmp_path / "full")
    assert sorted(_train_records(tmp_path / "full")) == [1, 2]
    final = [load_pth(tmp_path / run / "last.pth")["state_dict"] for run in ("full", "cut")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


# ---------------------------------------------------------------- learning rate and warm-up
@pytest.mark.parametrize("batch_size", [2, 4])
def test_default_lr_is_0_08_per_64_images_and_lr_overrides_it(shapes, tmp_path, batch_size):
    trainer = Trainer(_args(shapes, tmp_path / "default", batch_size=batch_size))
    lr = 0.08 * batch_size / 64
    assert trainer.lr == pytest.approx(lr)
    assert all(g["initial_lr"] == pytest.approx(lr) for g in trainer.optimizer.param_groups)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr / 10)  # warm-up starts at lr / 10
    assert trainer.total_steps == 20 * 8 // batch_size
    given = Trainer(_args(shapes, tmp_path / "given", "--lr", "0.03", batch_size=batch_size))
    assert given.lr == 0.03 and given.optimizer.param_groups[0]["lr"] == pytest.approx(0.003)


def _first_rates(trainer, steps):
    """The learning rates of the first `steps` updates, as the optimiser sees them (steps without gradients)."""
    rates = []
    for _ in range(steps):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    return rates


def test_warmup_is_shortened_to_a_tenth_of_a_short_run(shapes, tmp_path, capsys):
    short = Trainer(_args(shapes, tmp_path / "short", epochs=5))  # 20 steps; a 1-epoch warm-up would be 4
    assert "note: warm-up shortened to 0.5 epochs (a tenth of this 5-epoch run)" in capsys.readouterr().out
    assert short.total_steps == 20
    lr = short.lr
    assert _first_rates(short, 4) == pytest.approx([CosineLrSchedule(lr, 2, 20).lr_at(i) for i in range(4)])
    within = Trainer(_args(shapes, tmp_path / "within", "--warmup-epochs", "0.25", epochs=5))
    assert "warm-up shortened" not in capsys.readouterr().out
    assert _first_rates(within, 3) == pytest.approx([CosineLrSchedule(lr, 1, 20).lr_at(i) for i in range(3)])
    long = Trainer(_args(shapes, tmp_path / "long", epochs=20))  # a 1-epoch (4-step) warm-up is a tenth or less
    assert "warm-up shortened" not in capsys.readouterr().out
    rates = _first_rates(long, 5)
    assert rates == pytest.approx([CosineLrSchedule(lr, 4, 80).lr_at(i) for i in range(5)])
    assert rates[0] == pytest.approx(lr / 10) and rates[3] == pytest.approx(lr * (0.1 + 0.9 * 3 / 4))


# ---------------------------------------------------------------- optimiser, EMA, loss
def _step_with_gradients(trainer, value):
    """One optimiser step with every gradient set to `value`; returns `(lr, {name: (before, after)})`."""
    named = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.full_like(p, value)
    lr = trainer.optimizer.param_groups[0]["lr"]
    trainer.optimizer.step()
    return lr, {n: (before[n], named[n].detach()) for n in named}


def test_clip_norm_weight_decay_and_ema_decay_reach_the_optimiser_and_ema(shapes, tmp_path):
    """Gradients of 1000 everywhere: clipped by default to a global norm of 10; with --clip-norm 0 applied as
    they are, plus --weight-decay's L2 gradient on conv weights only; --ema-decay is the EMA's decay."""
    default = Trainer(_args(shapes, tmp_path / "default"))
    flags = Trainer(_args(shapes, tmp_path / "flags", "--clip-norm", "0", "--weight-decay", "0.01",
                          "--ema-decay", "0.5"))
    assert default.optimizer.clip_norm == 10.0 and flags.optimizer.clip_norm is None
    assert [g["l2"] for g in default.optimizer.param_groups] == [4e-5, 0.0, 0.0]
    assert [g["l2"] for g in flags.optimizer.param_groups] == [0.01, 0.0, 0.0]
    assert (default.ema.decay, flags.ema.decay) == (0.9998, 0.5)

    lr, moved = _step_with_gradients(default, 1000.0)
    update = torch.sqrt(sum(((b - a).double() ** 2).sum() for b, a in moved.values()))
    assert float(default.optimizer.last_grad_norm) == pytest.approx(10.0, rel=1e-4)
    assert float(update) == pytest.approx(lr * 10.0, rel=1e-3)  # first momentum step: the clipped gradient

    lr, moved = _step_with_gradients(flags, 1000.0)
    assert flags.optimizer.last_grad_norm is None  # no clipping ran
    bias_before, bias_after = moved["class_net.predict.conv_pw.bias"]  # no L2 on biases
    assert torch.allclose(bias_before - bias_after, torch.full_like(bias_before, lr * 1000.0), rtol=1e-4)
    weight_before, weight_after = moved["class_net.predict.conv_pw.weight"]  # conv weight: + 0.01 * w
    assert torch.allclose(weight_before - weight_after, lr * (1000.0 + 0.01 * weight_before), rtol=1e-4, atol=1e-9)

    for trainer, decay in ((default, 0.9998), (flags, 0.5)):
        trainer.ema.num_updates = 10 ** 6  # past the EMA's own warm-up, min(decay, (1 + n) / (10 + n))
        shadow = trainer.ema.module.class_net.predict.conv_pw.bias.clone()
        value = trainer.model.class_net.predict.conv_pw.bias.detach()
        trainer.ema.update(trainer.model)
        assert torch.allclose(trainer.ema.module.class_net.predict.conv_pw.bias, decay * shadow + (1 - decay) * value,
                              rtol=1e-5, atol=1e-7)


def test_label_smoothing_reaches_the_loss(shapes, tmp_path):
    """The trainer's class loss is `detection_loss` of its head outputs with --label-smoothing's value."""
    for smoothing in ("0", "0.1"):
        trainer = Trainer(_args(shapes, tmp_path / smoothing, "--label-smoothing", smoothing))
        heads = {}
        for name in ("class_net", "box_net"):
            getattr(trainer.model, name).register_forward_hook(
                lambda module, inputs, outputs, name=name: heads.__setitem__(name, outputs))
        losses = _seeded_losses(trainer)
        targets = trainer.assigner(GT_BOXES, GT_CLASSES)

        def cls_loss(label_smoothing):
            return float(detection_loss(heads["class_net"], heads["box_net"], targets.cls_targets,
                                        targets.box_targets, targets.num_positives,
                                        label_smoothing=label_smoothing)["cls_loss"])
        assert losses["cls_loss"] == pytest.approx(cls_loss(float(smoothing)), rel=1e-6)
        other = 0.1 if smoothing == "0" else 0.0
        assert losses["cls_loss"] != pytest.approx(cls_loss(other), rel=1e-3)  # the value makes a difference


# ---------------------------------------------------------------- --assigner atss, --sync-bn
def test_atss_assigner_is_what_the_trainer_trains_with(shapes, tmp_path):
    trainer = Trainer(_args(shapes, tmp_path / "atss", "--assigner", "atss"))
    assert trainer.assigner.method == "atss"
    generator = AnchorGenerator.from_config(trainer.model.config)
    ours = trainer.assigner(GT_BOXES, GT_CLASSES)
    atss = TargetAssigner.from_generator(generator, (SIZE, SIZE), method="atss")(GT_BOXES, GT_CLASSES)
    iou = TargetAssigner.from_generator(generator, (SIZE, SIZE), method="iou")(GT_BOXES, GT_CLASSES)
    assert all(torch.equal(a, b) for a, b in zip(ours, atss))
    assert not torch.equal(ours.cls_targets, iou.cls_targets)  # the flag changes which anchors are positive
    losses = trainer.train_step(_images(), GT_BOXES, GT_CLASSES)
    assert losses is not None and losses["num_positives"] == float(atss.num_positives) > 0


def test_sync_bn_alone_keeps_plain_batchnorm(shapes, tmp_path):
    """One process: nothing to synchronise with, so the trainer converts only under DDP (trainer.py); the
    model is the one without the flag, with the same losses."""
    synced = Trainer(_args(shapes, tmp_path / "sync", "--sync-bn"))
    plain = Trainer(_args(shapes, tmp_path / "plain"))
    kinds = [[type(m) for m in t.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
             for t in (synced, plain)]
    assert kinds[0] == kinds[1] and not any(issubclass(k, nn.SyncBatchNorm) for k in kinds[0])
    assert _seeded_losses(synced) == _seeded_losses(plain)


def test_sync_bn_under_cpu_ddp_is_refused_naming_the_flag(shapes, tmp_path, monkeypatch):
    """The trainer of rank 0 of a 2-process CPU run (`torchrun --nproc_per_node 2 main.py ... --sync-bn
    --device cpu`): WORLD_SIZE / RANK as torchrun sets them, over an already initialised gloo group (of one
    process, which is all DistributedDataParallel's construction needs). torch's SyncBatchNorm runs on CUDA
    only: refused in one line naming the flag, before the run folder is made (it used to fail inside DDP)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    try:
        with pytest.raises(ValueError, match="^--sync-bn: torch's SyncBatchNorm runs on CUDA devices only"):
            Trainer(_args(shapes, tmp_path / "ddp", "--sync-bn"))
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "ddp").exists()


# ---------------------------------------------------------------- --pretrained and the weights folder setting
def test_pretrained_training_reads_the_weights_folder_setting(shapes, tmp_path, monkeypatch, capsys):
    """`EFFICIENTDET_WEIGHTS_DIR=DIR main.py -mode train --pretrained` starts from DIR/efficientdet-d0.pth (a
    random 90-class D0 in the porter's format here), keeping all but the class-prediction layer."""
    torch.manual_seed(5)
    coco = build_model("efficientdet-d0", num_classes=90)
    save_weights(tmp_path / "efficientdet-d0.pth", coco.state_dict(), model_name="efficientdet-d0", num_classes=90,
                 ema=True, backbone_only=False, source="random weights in the porter's format (test)")
    monkeypatch.setenv("EFFICIENTDET_WEIGHTS_DIR", str(tmp_path))
    trainer = Trainer(_args(shapes, tmp_path / "run", "--pretrained"))
    assert f"initialised from {tmp_path / 'efficientdet-d0.pth'}" in capsys.readouterr().out
    assert torch.equal(trainer.model.backbone.stem.conv.weight, coco.backbone.stem.conv.weight)
