"""Training and evaluation steps, and the centralized fine-tuning run.

The step loop never synchronises with the host: losses are summed on the device and read once
per epoch (or per client in FedAvg), so the GPU is never left waiting for Python. Centralized
runs are resumable per epoch: a kill at any moment loses at most the epoch in flight, and the
resumed run writes the same metrics.csv as an uninterrupted one (bit for bit on a CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import models
from .checks import ConfigError, check_bool, check_choice, check_float, check_int
from .data import (
    DATASETS,
    DataBundle,
    ImageSet,
    augmentation_generator,
    epoch_batches,
    make_batch,
    sequential_batches,
)
from .optim import SCHEDULERS, SparseSGDM, make_scheduler
from .prepare import FineTuneSpec, prepare, run_head_cache
from .runs import Checkpoint, CheckpointSchedule, Run


@dataclass(frozen=True)
class CentralizedConfig:
    """Everything that determines a centralized run's numbers (its identity)."""

    dataset: str = "cifar100"
    model: str = "dino_vits16"
    img_size: int | None = None  # input pixels, a multiple of the patch size; None = the model's native
    seed: int = 0
    epochs: int = 10  # passes over the 45,000-image train split
    batch_size: int = 128  # images per optimizer step
    lr: float = 0.01  # peak learning rate (after warm-up)
    momentum: float = 0.9
    weight_decay: float = 5e-5
    scheduler: str = "cosine"  # 'cosine' | 'step' | 'constant'
    warmup_epochs: float = 0.0  # linear warm-up length, in epochs
    precision: str = "auto"  # 'auto' picks bf16 / fp16 / fp32 from the device
    evaluate_test: bool = True  # False for hyperparameter search: the test set only reports
    eval_points: int = 10  # evaluations, evenly spaced over the steps (the last step always)
    eval_subset: int = 1000  # images per split evaluated before the last step (eval_steps)
    full_val_curve: bool = False  # True: the full validation split at every evaluation, not its subset
    finetune: FineTuneSpec = field(default_factory=FineTuneSpec)  # step-0 head + sparse masks

    def __post_init__(self):
        check_run_fields(self, ("epochs",))
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_float("warmup_epochs", self.warmup_epochs, 0.0, self.epochs)

    def to_dict(self) -> dict:
        """The identity: the resolved img_size, so None and the native size name the same run."""
        return identity(self)

    def run_name(self) -> str:
        name = f"{self.scheduler}-lr{self.lr:g}-wd{self.weight_decay:g}"
        return f"{name}{self.finetune.short_name()}-s{self.seed}"

    def head_cache(self, ws, device=None):
        """Where this config's step-0 head is shared with every centralized run of the same data and seed."""
        return run_head_cache(ws, self, device, centralized=True)


def identity(config) -> dict:
    """What names a run of `config` (CentralizedConfig, FedAvgConfig) in the run store: its fields, with
    img_size resolved (None and the native size name the same run) and full_val_curve only where True
    (a run without it is named as if the field did not exist)."""
    values = {
        **asdict(config),
        "img_size": models.input_size(config.model, config.img_size),
        "finetune": config.finetune.identity(),
    }
    if not config.full_val_curve:
        values.pop("full_val_curve")
    return values


def check_run_fields(config, counts: tuple[str, ...]) -> None:
    """The checks every run config makes (CentralizedConfig, FedAvgConfig); `counts`: its own fields
    that must be integers >= 1."""
    check_choice("dataset", config.dataset, DATASETS)
    check_choice("model", config.model, models.MODELS)
    models.input_size(config.model, config.img_size)
    for name in ("seed", "batch_size", "eval_points", "eval_subset", *counts):
        check_int(name, getattr(config, name), minimum=0 if name == "seed" else 1)
    check_float("lr", config.lr, 0.0, None, low_open=True)
    check_float("momentum", config.momentum, 0.0, 1.0, high_open=True)
    check_float("weight_decay", config.weight_decay, 0.0, None)
    check_choice("precision", config.precision, models.PRECISIONS)
    check_bool("evaluate_test", config.evaluate_test)
    check_bool("full_val_curve", config.full_val_curve)
    if not isinstance(config.finetune, FineTuneSpec):
        raise ConfigError(f"finetune must be a FineTuneSpec, got {type(config.finetune).__name__}")


@dataclass
class RunResult:
    """What a notebook gets back from a run: its folder, summary and per-row metrics."""

    run: Run
    summary: dict
    metrics: pd.DataFrame


def read_complete(run: Run) -> RunResult:
    """A finished run's stored results (and no checkpoints left behind by a late kill)."""
    run.remove_leftover_checkpoints()
    return RunResult(run, run.summary(), run.metrics())


# --------------------------------------------------------------------------- steps


@dataclass
class Steps:
    """What train_steps did: the summed per-sample losses (a tensor on the device), the samples, the
    optimizer steps, those the fp16 loss scaler skipped, and those whose gradient the clip scaled down
    (SparseSGDM.clipped_steps; a tensor on the device, None for an optimizer that does not clip)."""

    loss_sum: torch.Tensor
    samples: int
    steps: int
    skipped: int
    clipped: torch.Tensor | None


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    precision: str,
    scheduler=None,
) -> Steps:
    """One optimizer step per batch; returns what they did (Steps), with no host sync.

    A step the fp16 GradScaler skips (inf/NaN gradients) still uses its batch. Skips are counted from
    the steps the optimizer took (a step hook), so a disabled scaler always counts 0.
    """
    model.train()
    loss_sum = torch.zeros(())
    samples = 0
    steps = 0
    taken = []
    clipped_before = getattr(optimizer, "clipped_steps", None)
    hook = optimizer.register_step_post_hook(lambda *_: taken.append(1))
    for inputs, labels in batches:
        steps += 1
        with models.autocast(inputs.device, precision):
            loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        loss_sum = loss_sum.to(loss.device) + loss.detach().float() * labels.shape[0]
        samples += labels.shape[0]
    hook.remove()
    clipped = None if clipped_before is None else optimizer.clipped_steps - clipped_before
    return Steps(loss_sum, samples, steps, steps - len(taken), clipped)


def clip_count(steps: Steps) -> float:
    """The steps the clip scaled down, as a number: NaN for an optimizer that does not clip, so that a
    run without a clip never reads as one whose clip never bound."""
    return math.nan if steps.clipped is None else int(steps.clipped)


@torch.inference_mode()
def evaluate(
    model: nn.Module, image_set: ImageSet, img_size: int, batch_size: int, *, precision: str
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy on `image_set`, without augmentation."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=image_set.labels.device)
    correct = torch.zeros((), device=image_set.labels.device, dtype=torch.long)
    for index in sequential_batches(len(image_set), batch_size, image_set.labels.device):
        inputs, labels = make_batch(image_set, index, img_size)
        with models.autocast(inputs.device, precision):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
    model.train(was_training)
    return {"loss": loss_sum.item() / len(image_set), "acc": correct.item() / len(image_set)}


def evaluate_splits(
    model, data: DataBundle, img_size, batch_size, *, precision, evaluate_test, subsets: dict | None = None
) -> dict:
    """{'val_loss', 'val_acc'[, 'test_loss', 'test_acc']} of the model as it is, on the full splits or,
    where `subsets` gives a split a size, on its fixed stratified subset of about that many images
    (DataBundle.eval_subset)."""
    subsets = subsets or {}
    row = {}
    for split in ("val", "test") if evaluate_test else ("val",):
        size = subsets.get(split)
        image_set = getattr(data, split) if size is None else data.eval_subset(split, size)
        result = evaluate(model, image_set, img_size, batch_size, precision=precision)
        row[f"{split}_loss"], row[f"{split}_acc"] = result["loss"], result["acc"]
    return row


def eval_steps(total: int, points: int) -> list[int]:
    """The steps (or rounds), counted from 1, after which a run evaluates: `points` evenly spaced, the last
    always. Earlier ones use the evaluation subsets; the last one the full splits, for every reported or
    selecting number."""
    points = min(points, total)
    return [-(-k * total // points) for k in range(1, points + 1)]


# Row columns that count or locate the row itself: the summary holds their run totals, not the last row's.
PER_ROW = ("epoch", "round", "clients", "samples", "skipped_steps", "clip_fraction")


def summarize(rows: list[dict], timing: list[dict], precision: str, device) -> dict:
    """summary.json: the final evaluated row's values, the best validation accuracy, wall time, and over
    the run: the images trained on (trained_images), the steps the fp16 loss scaler skipped
    (skipped_steps) and the share of the steps the clip scaled down (clip_fraction, absent without a
    clip)."""
    evaluated = [r for r in rows if "val_acc" in r]
    best = max(evaluated, key=lambda r: r["val_acc"])
    summary = {f"final_{k}": v for k, v in evaluated[-1].items() if k not in PER_ROW}
    summary.update(
        best_val_acc=best["val_acc"],
        best_val_at=best.get("epoch", best.get("round")),
        wall_s=timing[-1]["wall_s"],
        precision=precision,
        device=str(device),
    )
    trained = [r for r in rows if r.get("samples")]  # none for the step-0 head alone
    summary["trained_images"] = sum(r["samples"] for r in trained)
    summary["skipped_steps"] = sum(r["skipped_steps"] for r in trained)
    clipping = [r for r in trained if not math.isnan(r["clip_fraction"])]  # none for a run without a clip
    if (
        clipping
    ):  # per image: exact for FedAvg's equal rounds, centrally up to each epoch's smaller last batch
        clipped = sum(r["clip_fraction"] * r["samples"] for r in clipping)
        summary["clip_fraction"] = clipped / sum(r["samples"] for r in clipping)
    return summary


def training_batches(image_set: ImageSet, img_size: int, batch_indices, generator):
    """Augmented (inputs, labels) for each index tensor, built lazily on the device."""
    for index in batch_indices:
        yield make_batch(image_set, index, img_size, generator)


# ----------------------------------------------------------------------- flat views of the trainable weights


def read_flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def moving_entries(names: list[str], params: list[torch.Tensor], masks: dict | None) -> torch.Tensor | None:
    """The flat bool vector of the entries training can change (the layout of read_flat); None if all."""
    if not masks:
        return None
    pieces = []
    for name, param in zip(names, params):
        if name in masks:
            pieces.append(masks[name].reshape(-1).bool())
        else:
            pieces.append(torch.ones(param.numel(), dtype=torch.bool, device=param.device))
    return torch.cat(pieces)


@torch.no_grad()
def load_flat(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


def sparse_state(params: list[torch.Tensor], optimizer, moving: torch.Tensor) -> dict:
    """What a sparse centralized run's checkpoint needs of its model and optimizer: the weights and the
    momentum buffers, only their entries the masks let change (the others keep their start values)."""
    buffers = [optimizer.state[p].get("momentum_buffer") for p in params]
    momentum = None  # no momentum, or no step yet
    if any(b is not None for b in buffers):  # a parameter that never had a gradient has a zero buffer
        momentum = read_flat([torch.zeros_like(p) if b is None else b for p, b in zip(params, buffers)])[
            moving
        ]
    lrs = [group["lr"] for group in optimizer.param_groups]  # the scheduler's current step size
    return {"weights": read_flat(params)[moving], "momentum": momentum, "lr": lrs}


def load_sparse_state(state: dict, params: list[torch.Tensor], optimizer, moving: torch.Tensor) -> None:
    """The inverse of sparse_state, into a model and optimizer at their start values."""
    weights = read_flat(params)
    weights[moving] = state["weights"].to(weights.device)
    load_flat(params, weights)
    for group, lr in zip(optimizer.param_groups, state["lr"]):
        group["lr"] = lr
    if state["momentum"] is None:
        return
    momentum = torch.zeros_like(weights)  # a frozen entry's buffer stays 0 (optim.SparseSGDM)
    momentum[moving] = state["momentum"].to(weights.device)
    for p, chunk in zip(params, momentum.split([p.numel() for p in params])):
        optimizer.state[p]["momentum_buffer"] = chunk.view_as(p).clone()


# --------------------------------------------------------------------------- centralized run


def run_folder(ws, config) -> Run:
    """The run of a centralized or FedAvg config in the run store, named by the config."""
    return ws.run(config.run_name(), config.to_dict())


def check_run_options(eval_batch_size=256, checkpoint_every=None, checkpoint_minutes=15) -> None:
    """The options every runner takes besides the config (notebook parameters of the same names)."""
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every, minimum=1)
    check_float("checkpoint_minutes", checkpoint_minutes, 0.0, None, low_open=True)


def train_or_read(
    run: Run,
    start_training: Callable[[Run, int], TrainingRun],
    *,
    eval_batch_size: int = 256,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float = 15,
    save_weights: bool = False,
    progress: bool = True,
) -> RunResult:
    """`run` read back if complete; otherwise trained under its lock, from its last checkpoint.

    start_training(run, eval_batch_size) builds the run's TrainingRun; it is called only under the lock,
    since it writes the run's step-0/1 preparation. Checkpoints: every `checkpoint_every` epochs or rounds,
    or with None after `checkpoint_minutes` of wall time (runs.CheckpointSchedule); save_weights: also
    model.pt; progress: a progress bar.
    """
    check_run_options(eval_batch_size, checkpoint_every, checkpoint_minutes)
    if run.is_complete:
        return read_complete(run)
    with run:
        if run.is_complete:  # finished by another process between the check above and taking its lock
            return read_complete(run)
        schedule = CheckpointSchedule(checkpoint_every, checkpoint_minutes)  # its clock counts preparation
        trainer = start_training(run, eval_batch_size)
        return trainer.train(schedule, save_weights, progress)


class TrainingRun:
    """What a centralized and a FedAvg run share: the model after steps 0 and 1 (prepare), resuming from a
    checkpoint, the loop over epochs or rounds with its checkpoints, and the results it leaves.

    A subclass says how many epochs or rounds there are (`units`), trains one (`train_unit`, which appends
    the metrics and timing rows) and says what a checkpoint holds (`state`, `restore`).
    """

    label = "run"  # the progress bar's name

    def __init__(self, ws, data: DataBundle, config, run: Run, *, shards, eval_batch_size):
        self.data = data
        self.config = config
        self.run = run
        self.eval_batch_size = eval_batch_size
        self.device = data.device
        self.img_size = models.input_size(config.model, config.img_size)
        self.precision = models.resolve_precision(config.precision, self.device)
        self.model = ws.build_model(config.model, data.num_classes, config.seed, self.img_size)
        self.model.to(self.device)
        self.prepared = prepare(
            run,
            self.model,
            data,
            config.finetune,
            seed=config.seed,
            img_size=self.img_size,
            precision=self.precision,
            shards=shards,
            head_cache=config.head_cache(ws, self.device),  # keyed by the precision it trains at
        )
        named = dict(self.model.named_parameters())
        self.params = [named[n] for n in self.prepared.trainable_names]
        self.rows = []  # metrics.csv
        self.timing = []  # timing.csv

    def train(self, schedule: CheckpointSchedule, save_weights: bool, progress: bool) -> RunResult:
        """From the last checkpoint (or the start) to the last epoch or round, then the run's results."""
        start = self.resume()
        total = self.units()
        bar = tqdm(
            range(start, total),
            desc=f"{self.label} {self.run.dir.name}",
            initial=start,
            total=total,
            disable=not progress,
        )
        for index in bar:
            self.train_unit(index)
            if self.rows:  # a centralized epoch may end without an evaluation row
                shown = {k: f"{v:.3f}" for k, v in self.rows[-1].items() if k in ("train_loss", "val_acc")}
                bar.set_postfix(shown)
            done = index + 1
            if done < total and schedule.due(done):
                self.run.save_checkpoint(Checkpoint(done, self.state(), self.rows, self.timing))
        return self.finish(save_weights)

    def resume(self) -> int:
        """The epochs or rounds done, restored from the run's checkpoint (0 without one)."""
        checkpoint = self.run.load_checkpoint(map_location=self.device)
        if checkpoint is None:
            return 0
        self.restore(checkpoint.state)
        self.rows = checkpoint.rows
        self.timing = checkpoint.timing
        return checkpoint.step

    def new_optimizer(self, lr: float, **client_terms) -> SparseSGDM:
        """SGD with momentum over the trainable parameters at `lr`; masked entries never move, and the
        gradient is clipped to finetune.max_grad_norm. client_terms: a federated client's prox_mu and
        anchors (FedProx) or corrections (SCAFFOLD), see SparseSGDM."""
        masks = self.prepared.masks
        aligned = [masks.get(n) for n in self.prepared.trainable_names] if masks else None
        return SparseSGDM(
            self.params,
            lr=lr,
            momentum=self.config.momentum,
            weight_decay=self.config.weight_decay,
            masks=aligned,
            max_grad_norm=self.config.finetune.max_grad_norm,
            **client_terms,
        )

    def evaluate(self, last: bool) -> dict:
        """Validation (and test) loss and accuracy of the model: the full splits at the end, else subsets
        (the full validation split at every point with full_val_curve)."""
        subset = self.config.eval_subset
        subsets = {} if last else {"val": None if self.config.full_val_curve else subset, "test": subset}
        return evaluate_splits(
            self.model,
            self.data,
            self.img_size,
            self.eval_batch_size,
            precision=self.precision,
            evaluate_test=self.config.evaluate_test,
            subsets=subsets,
        )

    def summary(self) -> dict:
        """summary.json: the last evaluated values, the best validation accuracy, the preparation's info."""
        return {**summarize(self.rows, self.timing, self.precision, self.device), **self.prepared.info}

    def finish(self, save_weights: bool) -> RunResult:
        """summary.json, metrics.csv and timing.csv (and model.pt with save_weights): the run is complete."""
        summary = self.summary()
        if save_weights:
            weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            self.run.save_artifact("model.pt", weights)
        self.run.finish(summary, self.rows, self.timing)
        return RunResult(self.run, summary, self.run.metrics())


def run_centralized(ws, data: DataBundle, config: CentralizedConfig, **options) -> RunResult:
    """Fine-tune centrally for `config.epochs`, resuming from a checkpoint; a complete run is read back.

    options: eval_batch_size, checkpoint_every, checkpoint_minutes, save_weights, progress (train_or_read).
    """

    data.check_is(config.dataset)

    def start_training(run: Run, eval_batch_size: int) -> CentralizedRun:
        return CentralizedRun(ws, data, config, run, eval_batch_size=eval_batch_size)

    return train_or_read(run_folder(ws, config), start_training, **options)


class CentralizedRun(TrainingRun):
    """One centralized run's state between epochs: the model, optimizer, lr scheduler and loss scaler.

    An epoch is a loop over the steps of one pass over the train split; it stops at the steps eval_steps
    names to evaluate and log a row, and a checkpoint may follow it.
    """

    label = "centralized"

    def __init__(self, ws, data, config, run, *, eval_batch_size):
        shards = [np.arange(len(data.train))]  # one client holding the whole train split
        super().__init__(ws, data, config, run, shards=shards, eval_batch_size=eval_batch_size)
        self.steps_per_epoch = -(-len(data.train) // config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer, self.scheduler = self.optimizer_and_scheduler()
        self.scaler = models.grad_scaler(self.device, self.precision)
        self.eval_points = eval_steps(self.total_steps, config.eval_points)
        # A sparse run checkpoints only the entries its masks let change (sparse_state), a dense one all.
        self.moving = moving_entries(self.prepared.trainable_names, self.params, self.prepared.masks)
        # Carried from row to row (and through checkpoints): since the last evaluation row, the train loss
        # sum, samples, steps, skipped and clipped steps and train seconds; the run's wall seconds so far.
        self.carry = {
            "loss": 0.0,
            "samples": 0,
            "steps": 0,
            "skipped": 0,
            "clipped": 0,
            "train_s": 0.0,
            "wall_s": 0.0,
        }

    def units(self) -> int:
        return self.config.epochs

    def optimizer_and_scheduler(self) -> tuple[SparseSGDM, torch.optim.lr_scheduler.LRScheduler]:
        """SGD with momentum over the trainable parameters, and its lr schedule over all the steps."""
        config = self.config
        optimizer = self.new_optimizer(config.lr)
        warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)
        scheduler = make_scheduler(optimizer, config.scheduler, self.total_steps, warmup_steps)
        return optimizer, scheduler

    def parts(self) -> dict:
        """The objects whose state_dict a checkpoint holds whole."""
        parts = {"scheduler": self.scheduler, "scaler": self.scaler}
        if self.moving is None:
            parts.update(model=self.model, optimizer=self.optimizer)
        return parts

    def state(self) -> dict:
        """What a resume needs after an epoch."""
        state = {key: part.state_dict() for key, part in self.parts().items()}
        state["carry"] = self.carry
        if self.moving is not None:
            state["sparse"] = sparse_state(self.params, self.optimizer, self.moving)
        return state

    def restore(self, state: dict) -> None:
        for key, part in self.parts().items():
            part.load_state_dict(state[key])
        if self.moving is not None:
            load_sparse_state(state["sparse"], self.params, self.optimizer, self.moving)
        self.carry = state["carry"]

    def train_unit(self, epoch: int) -> None:
        """One pass over the train split, in stretches of steps that end at its evaluation points."""
        first = epoch * self.steps_per_epoch  # steps before this epoch
        started = time.perf_counter()  # building the epoch's batch order counts as training time
        batches = self.epoch_batches(epoch)
        done = 0
        for end in self.stretch_ends(first):
            self.train_stretch(islice(batches, end - done))
            done = end
            train_s = time.perf_counter() - started
            self.carry["train_s"] += train_s
            self.carry["wall_s"] += train_s
            if first + end in self.eval_points:
                self.log_row(first + end)
            started = time.perf_counter()

    def stretch_ends(self, first: int) -> list[int]:
        """The epoch's evaluation points, then its last step if no evaluation ends it (steps within it)."""
        ends = [p - first for p in self.eval_points if first < p <= first + self.steps_per_epoch]
        if ends[-1:] != [self.steps_per_epoch]:
            ends.append(self.steps_per_epoch)
        return ends

    def epoch_batches(self, epoch: int):
        """The epoch's augmented batches, from its own seed streams (seed, epoch)."""
        config = self.config
        order = epoch_batches(
            len(self.data.train), config.batch_size, config.seed, "epoch", epoch, device=self.device
        )
        generator = augmentation_generator(config.seed, "epoch", epoch, device=self.device)
        return training_batches(self.data.train, self.img_size, order, generator)

    def train_stretch(self, batches) -> None:
        """One optimizer step per batch; what they did joins the carry."""
        done = train_steps(
            self.model,
            self.optimizer,
            self.scaler,
            batches,
            precision=self.precision,
            scheduler=self.scheduler,
        )
        self.carry["loss"] += done.loss_sum.item()
        self.carry["samples"] += done.samples
        self.carry["steps"] += done.steps
        self.carry["skipped"] += done.skipped
        self.carry["clipped"] += clip_count(done)

    def log_row(self, step: int) -> None:
        """Evaluates and logs the row after `step` (the full splits at the last step, else subsets)."""
        started = time.perf_counter()
        row = {
            "epoch": step / self.steps_per_epoch,
            "lr": self.scheduler.get_last_lr()[0],
            "samples": self.carry["samples"],
            "train_loss": self.carry["loss"] / self.carry["samples"],
            "skipped_steps": self.carry["skipped"],
            "clip_fraction": self.carry["clipped"] / self.carry["steps"],
            **self.evaluate(last=step == self.total_steps),
        }
        eval_s = time.perf_counter() - started
        self.carry["wall_s"] += eval_s
        self.rows.append(row)
        self.timing.append(
            {
                "epoch": row["epoch"],
                "train_s": self.carry["train_s"],
                "eval_s": eval_s,
                "wall_s": self.carry["wall_s"],
            }
        )
        self.carry.update(loss=0.0, samples=0, steps=0, skipped=0, clipped=0, train_s=0.0)
