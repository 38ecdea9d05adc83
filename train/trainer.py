"""The training loop of `-mode train|trainval`: official recipe, exact resume, DDP, per-epoch COCO evaluation.

Run folder (`--output`, checked writable before any work): `last.pth` (everything needed to resume, written
every `--save-every` steps, at each epoch end and when a SIGINT / SIGTERM stops the run, see `train.interrupt`),
`best.pth` (EMA weights with the best val AP, `trainval`), `metrics.jsonl` (one line per logging step and per
evaluation). All files but the log are written atomically, by rank 0 only.

Unreadable training images are skipped (the next readable one takes their place), reported as they happen
and counted per epoch; the run stops, after saving `last.pth`, as soon as their count passes
`--max-bad-images`.

With validation `curves.png` (`train.curves`) is redrawn after each evaluation, else at the end of the run;
`--keep N` keeps the N best evaluated checkpoints (`train.keep_best`), `--tensorboard` writes the logged
values as TensorBoard scalars too (`train.tensorboard_log`), `--freeze` fine-tunes the heads (and BiFPN)
only (`train.freeze`).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.bad_images import BadImageBudget
from data.coco import CocoDetection, collate_detection
from data.transforms import TrainTransform
from eval.coco_eval import evaluate_coco
from eval.evaluator import Detector, readable_image_ids, run_detection
from eval.voc_eval import evaluate_voc, reports_voc_metric
from model import build_model, get_config
from model.config import BN_MOMENTUM
from utils.image_size import resolve_image_size
from train.curves import draw_curves
from train.distributed import broadcast, cleanup, gather_lists, init_distributed
from train.ema import unwrap_model
from train.freeze import check_freeze_start, freeze_
from train.initial_weights import load_initial_weights
from train.interrupt import Interrupted, StopRequests
from train.keep_best import keep_best
from train.loss import detection_loss
from train.optim import run_warmup_epochs
from train.step import TrainStep, lr_schedule
from train.run_config import changed_run_flags, run_config, truncate_metrics
from train.tensorboard_log import TensorBoardLog, summary_writer_class
from data.atomic import append_line, check_writable_dir, refuse_unwritable_output
from utils.cli import DEFAULT_MODEL, dataset_paths, resolve_device
from utils.weights import atomic_torch_save, load_pth

MAX_NON_FINITE_IN_A_ROW = 5


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.tensorboard:
            summary_writer_class()  # a missing tensorboard package is said before any work
        check_freeze_start(args)
        self.output = Path(args.output or f"runs/{args.model or DEFAULT_MODEL}")
        self._check_run_folder()  # created only once the inputs are good: a run refused on them leaves none
        self.dist, self.device = init_distributed(resolve_device(args.device))
        if args.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise ValueError(f"--sync-bn: torch's SyncBatchNorm runs on CUDA devices only, not {self.device.type}; "
                             f"drop the flag (each process then normalises its own batch)")
        self.validate = hasattr(args, "eval_every")
        self.model_name = args.model or DEFAULT_MODEL
        torch.manual_seed(args.seed)

        ann, images = dataset_paths(args, "train")
        config = get_config(self.model_name)
        self.image_size = resolve_image_size(config, args.image_size)  # (H, W)
        normalization = {"mean_rgb": config.mean_rgb, "stddev_rgb": config.stddev_rgb}
        self.train_set = CocoDetection(ann, images, train=True, image_size=self.image_size, seed=args.seed,
                                       transform=TrainTransform(self.image_size, *args.jitter,
                                                                autoaugment=args.autoaugment, **normalization))
        if self.validate:
            ann, images = dataset_paths(args, "val")
            self.val_set = CocoDetection(ann, images, train=False, image_size=self.image_size, **normalization)
        self.model = build_model(self.model_name, num_classes=self.train_set.num_classes).to(self.device)
        started_from = load_initial_weights(self.model, args)
        if started_from:
            self._say(started_from)
        if args.sync_bn and self.dist.enabled:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        frozen = freeze_(self.model, args.freeze)  # before the optimiser is built: it leaves them out
        if frozen:
            self._say(f"frozen (weights and BN statistics): {' and '.join(frozen)}")

        per_rank = len(self.train_set) // self.dist.world_size
        self.steps_per_epoch = per_rank // args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {args.batch_size}: the training set has {len(self.train_set)} images, "
                             f"fewer than one batch per process ({self.dist.world_size} process(es))")
        schedule = lr_schedule(args, self.steps_per_epoch, args.batch_size * self.dist.world_size)
        warmup = run_warmup_epochs(args.warmup_epochs, args.epochs)
        if warmup < args.warmup_epochs:
            self._say(f"note: warm-up shortened to {warmup:g} epochs (a tenth of this {args.epochs:g}-epoch run)")
        self.schedule, self.lr, self.total_steps = schedule, schedule.base_lr, schedule.total_steps
        self.step_fn = TrainStep.from_flags(self.model, args, self.image_size, schedule, self.device, self.dist,
                                            loss=detection_loss)
        self.optimizer, self.scheduler, self.ema = self.step_fn.optimizer, self.step_fn.scheduler, self.step_fn.ema
        self.scaler, self.assigner, self.amp_dtype = self.step_fn.scaler, self.step_fn.assigner, self.step_fn.amp_dtype
        self.step, self.epoch, self.best_ap, self.non_finite = 0, 0, -1.0, 0
        self.eval_pending = False  # an epoch-end evaluation a signal made the run skip: done first on resume
        self.in_a_row = 0  # non-finite losses in a row (across epochs)
        self.start_time = time.perf_counter()
        self._prepare_run_folder()
        torch.manual_seed(args.seed + self.dist.rank)  # drop-connect differs per rank, init did not
        if args.resume:
            self._resume()
        self.tensorboard = TensorBoardLog(self.output) if args.tensorboard and self.dist.is_main else None
        if self.dist.enabled:
            self.step_fn.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---------------------------------------------------------------- set-up
    def _check_run_folder(self) -> None:
        """Refuse an --output that cannot be written, holds another run, or has no run to --resume."""
        refuse_unwritable_output(self.output)
        last = self.output / "last.pth"
        if last.exists() and not self.args.resume:
            raise FileExistsError(f"--output {self.output}: already holds a run (last.pth); use --resume to "
                                  f"continue it or choose another --output")
        if self.args.resume and not last.exists():
            raise FileNotFoundError(f"--resume: {last} does not exist (nothing to resume)")

    def _prepare_run_folder(self) -> None:
        check_writable_dir(self.output)
        if not self.args.resume and self.dist.is_main:  # a run killed before its first checkpoint left this
            (self.output / "metrics.jsonl").unlink(missing_ok=True)

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    # ---------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        return {"model_name": self.model_name, "num_classes": self.train_set.num_classes,
                "class_names": self.train_set.class_names, "class_to_category": self.train_set.class_to_category,
                "image_size": self.image_size}

    def save_last(self) -> None:
        if not self.dist.is_main:
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        atomic_torch_save({**self._meta(), "config": run_config(self.args), "state_dict": unwrap_model(self.model).state_dict(),
                           "ema_state_dict": self.ema.module.state_dict(), "ema_updates": self.ema.num_updates,
                           "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                           "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                           "best_ap": self.best_ap, "non_finite": self.non_finite, "rng": rng,
                           "eval_pending": self.eval_pending},
                          self.output / "last.pth")

    def _resume(self) -> None:
        ckpt = load_pth(self.output / "last.pth", map_location=self.device)
        changed = changed_run_flags(ckpt["config"], self.args)
        if changed:
            raise ValueError(f"--resume {self.output}: the run was started with other flags: {'; '.join(changed)}")
        unwrap_model(self.model).load_state_dict(ckpt["state_dict"])
        self.ema.module.load_state_dict(ckpt["ema_state_dict"])
        self.ema.num_updates = ckpt["ema_updates"]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.best_ap, self.non_finite = (ckpt["step"], ckpt["epoch"], ckpt["best_ap"],
                                                                ckpt["non_finite"])
        self.eval_pending = bool(ckpt.get("eval_pending", False))
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)
        if self.dist.is_main:  # forget what was logged after the checkpoint: those steps are redone
            truncate_metrics(self.output / "metrics.jsonl", self.step)
        self._say(f"resumed {self.output} at step {self.step} (epoch {self.epoch + 1})")

    # ---------------------------------------------------------------- training
    def _loader(self, epoch: int) -> DataLoader:
        """This rank's batches of `epoch`, in a per-epoch seeded order, minus those done before a resume."""
        mine = epoch_order(len(self.train_set), self.args.seed, epoch, self.steps_per_epoch * self.args.batch_size,
                           self.dist.rank, self.dist.world_size)
        done = (self.step - epoch * self.steps_per_epoch) * self.args.batch_size
        self.train_set.set_epoch(epoch)
        return DataLoader(Subset(self.train_set, mine[done:].tolist()), batch_size=self.args.batch_size,
                          num_workers=self.args.workers, collate_fn=collate_detection, drop_last=True,
                          pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.args.seed))  # keeps the global RNG untouched

    def forward_losses(self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """This process's losses of a batch through the training model, with autograd (`TrainStep.forward`)."""
        return self.step_fn.forward(images, gt_boxes, gt_classes).losses

    def train_step(self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> dict | None:
        """One optimisation step (`TrainStep`): the global batch's losses, or None when not finite (skipped)."""
        return self.step_fn(images, gt_boxes, gt_classes)

    def fit(self, max_steps: int | None = None) -> dict:
        """Train to the end (or for `max_steps` more steps, then save and stop). Returns the last metrics.

        Raises `Interrupted` after saving `last.pth` when a SIGINT / SIGTERM arrived (all ranks stop after
        the same step), RuntimeError when too many images are unreadable or the loss stays non-finite.
        """
        stop_at = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        self._say(f"training {self.model_name} on {len(self.train_set)} images ({self.train_set.num_classes} classes)"
                  f" at {self.image_size} px: {self.total_steps} steps of {self.args.batch_size} x "
                  f"{self.dist.world_size} images, lr {self.lr:g}, {self.args.assigner} assignment -> {self.output}")
        last = {}
        # One bar for the steps this run does (a fractional --epochs or a resume does not end on an epoch).
        bar = tqdm(total=stop_at - self.step, unit="step", disable=not self.dist.is_main, dynamic_ncols=True)
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        try:
            with StopRequests(self.dist, self.device) as stop:
                if self.eval_pending:
                    last.update(self.evaluate())
                while self.step < stop_at:
                    self.epoch = self.step // self.steps_per_epoch
                    bar.set_description(f"epoch {self.epoch + 1}/{epochs}")
                    if self._train_epoch(stop_at, stop, bar, last):
                        break
        finally:
            bar.close()
            cleanup(self.dist)
            if self.tensorboard is not None:
                self.tensorboard.close()
        if not self.validate and self.dist.is_main:
            draw_curves(self.output)
        self._say(f"done: step {self.step}/{self.total_steps} in {_hms(time.perf_counter() - self.start_time)}"
                  + (f", best AP {self.best_ap:.4f}" if self.validate else ""))
        return last

    def _train_epoch(self, stop_at: int, stop: StopRequests, bar: tqdm, last: dict) -> bool:
        """The rest of epoch `self.epoch`, or up to `stop_at`; True when the run is to end there."""
        images_per_epoch = self.steps_per_epoch * self.args.batch_size * self.dist.world_size
        bad_images = BadImageBudget(self.args.max_bad_images, images_per_epoch,
                                    f"epoch {self.epoch + 1} on {self.train_set.image_dir}")
        tick, tick_step = time.perf_counter(), self.step
        for images, t in self._loader(self.epoch):
            lr = self.optimizer.param_groups[0]["lr"]
            losses = self.train_step(images.to(self.device, non_blocking=True), t["gt_boxes"].to(self.device),
                                     t["gt_classes"].to(self.device))
            signum, bad = stop.poll(t["num_failed"])  # every rank, every batch: all take the same branches
            try:
                bad_images.add(t["failures"], bad)
            except RuntimeError:
                self.save_last()
                raise
            if losses is None:
                self.non_finite, self.in_a_row = self.non_finite + 1, self.in_a_row + 1
                if self.in_a_row > MAX_NON_FINITE_IN_A_ROW:
                    raise RuntimeError(f"loss not finite for {self.in_a_row} steps in a row (step {self.step}); "
                                       f"lower --lr or check the data")
                if signum:
                    self._stop(signum)
                continue
            self.in_a_row = 0
            self.step += 1
            bar.update(1)
            rate = (self.step - tick_step) * self.args.batch_size * self.dist.world_size / (time.perf_counter() - tick)
            current = {"loss": losses["loss"], "cls_loss": losses["cls_loss"], "box_loss": losses["box_loss"],
                       "lr": lr, "img_per_s": rate}
            last.update(current)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", cls=f"{losses['cls_loss']:.4f}",
                            box=f"{losses['box_loss']:.5f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            if self.step % self.args.log_every == 0 or self.step == stop_at:
                self._log({"type": "train", "epoch": self.epoch + 1, "step": self.step, **current,
                           "num_positives": losses["num_positives"], "non_finite_skipped": self.non_finite})
            epoch_done = self.step % self.steps_per_epoch == 0
            # Also at the very end when --epochs ends mid-epoch, so the final weights are evaluated.
            if self.validate and ((epoch_done and (self.epoch + 1) % self.args.eval_every == 0)
                                  or self.step == self.total_steps):
                if signum:  # stop now; the resumed run evaluates these weights first
                    self.eval_pending = True
                else:
                    last.update(self.evaluate())
                    signum = stop.poll()[0]  # a signal during the evaluation stops the run here
            if signum:
                self._stop(signum)
            if self.step % self.args.save_every == 0 or epoch_done or self.step == stop_at:
                self.save_last()
            if self.step == stop_at:
                return True
        return False

    def _stop(self, signum: int) -> None:
        self.save_last()
        raise Interrupted(self.step, signum, speak=self.dist.is_main)

    # ---------------------------------------------------------------- evaluation and logging
    def evaluate(self) -> dict:
        """COCO AP of the EMA weights on the val images that could be read (sharded over ranks); keeps best.pth
        (by COCO AP). A VOC val set also gets the VOC metric (`eval.voc_eval`: mAP, all-point and 11-point),
        logged and printed beside it.

        Unreadable images stop the evaluation as soon as they pass --max-bad-images; under DDP the ranks'
        counts are summed, and checked, once their detections are gathered.
        """
        self.eval_pending = False
        detector = Detector(self.ema.module, self.image_size, "eval", self.args.val_nms)
        count = min(self.args.val_max_images or len(self.val_set), len(self.val_set))
        budget = BadImageBudget(self.args.max_bad_images, count, f"evaluation on {self.val_set.image_dir}",
                                speak=self.dist.is_main)
        results, run, failures = run_detection(
            detector, self.val_set, self.args.batch_size, self.args.workers, self.device, self.args.val_max_images,
            self.dist.rank, self.dist.world_size, progress=self.dist.is_main,
            bad_images=None if self.dist.enabled else budget)
        results, failures = gather_lists(results, self.dist), gather_lists(failures, self.dist)
        if self.dist.enabled:
            budget.add(failures)
        stats, voc = None, {}
        if self.dist.is_main:
            image_ids = readable_image_ids(self.val_set, count, failures)
            stats = evaluate_coco(self.val_set.coco, results, image_ids)
            if reports_voc_metric(self.val_set.coco):
                metric = evaluate_voc(self.val_set.coco, results, image_ids)
                voc = {"voc_mAP": metric["mAP"], "voc_mAP_07": metric["mAP_07"]}
        stats, voc = broadcast((stats, voc), self.dist)
        improved = stats["AP"] > self.best_ap
        self.best_ap = max(self.best_ap, stats["AP"])
        if self.dist.is_main:
            checkpoint = {**self._meta(), "ema_state_dict": self.ema.module.state_dict(), "step": self.step,
                          "epoch": self.epoch + 1, "stats": stats}
            if improved:
                atomic_torch_save(checkpoint, self.output / "best.pth")
            if self.args.keep:
                keep_best(self.output, checkpoint, self.epoch + 1, stats["AP"], self.args.keep)
        self._log({"type": "eval", "epoch": self.epoch + 1, "step": self.step, **stats, "best_AP": self.best_ap, **voc})
        voc_note = f"  VOC mAP {voc['voc_mAP']:.4f} (11-point {voc['voc_mAP_07']:.4f})" if voc else ""
        self._say(f"epoch {self.epoch + 1}: AP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  AP75 {stats['AP75']:.4f}"
                  f"{voc_note}  (best {self.best_ap:.4f}, {run['img_per_s']:.1f} img/s)" + self._early_note())
        if self.dist.is_main:
            draw_curves(self.output)
        return {"AP": stats["AP"], "AP50": stats["AP50"]}

    def _early_note(self) -> str:
        """Said with the evaluations in the first quarter of a run from scratch, whose AP under-reports."""
        if self.args.pretrained or self.args.weights or self.step > self.total_steps / 4:
            return ""
        decay = self.ema.decay_at(self.ema.num_updates)
        return (f"\n  early evaluation, AP under-reports: the EMA weights lag the trained ones by ~"
                f"{max(decay / (1 - decay), 1):.0f} steps and BN running statistics (momentum {BN_MOMENTUM:g}) lag the "
                f"weights, both by design")

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            record = {**record, "images": record["step"] * self.args.batch_size * self.dist.world_size}
            if self.tensorboard is not None:
                self.tensorboard.add(record)
            append_line(self.output / "metrics.jsonl",
                        json.dumps({**record, "time": round(time.perf_counter() - self.start_time, 2)}))


def epoch_order(num_images: int, seed: int, epoch: int, per_rank: int, rank: int = 0, world_size: int = 1
                ) -> np.ndarray:
    """The dataset indices rank `rank` trains on in `epoch`, in order: a permutation seeded by `(seed, epoch)`,
    dealt round-robin to the ranks, the first `per_rank` (whole batches) of this rank's share."""
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    return order[rank::world_size][:per_rank]


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
