"""Training and evaluation steps, and the centralized fine-tuning run.

The step loop never synchronises with the host: losses are summed on the device and read once
per epoch (or per client in FedAvg), so the GPU is never left waiting for Python. Centralized
runs are resumable per epoch: a kill at any moment loses at most the epoch in flight, and the
resumed run writes the same metrics.csv as an uninterrupted one (bit for bit on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Iterable

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
from .finetune import FineTuneSpec, Prepared, head_cache_path, prepare
from .optim import SCHEDULERS, SparseSGDM, make_scheduler
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
    finetune: FineTuneSpec = field(default_factory=FineTuneSpec)  # step-0 head + sparse masks

    def __post_init__(self):
        check_run_fields(self, ("epochs",))
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_float("warmup_epochs", self.warmup_epochs, 0.0, self.epochs)

    def to_dict(self) -> dict:
        """The identity: the resolved img_size, so None and the native size name the same run."""
        return {
            **asdict(self),
            "img_size": models.input_size(self.model, self.img_size),
            "finetune": self.finetune.identity(),
        }

    def run_name(self) -> str:
        name = f"{self.scheduler}-lr{self.lr:g}-wd{self.weight_decay:g}"
        return f"{name}{self.finetune.short_name()}-s{self.seed}"


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


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    precision: str,
    scheduler=None,
) -> tuple[torch.Tensor, int, int]:
    """One optimizer step per batch; returns (summed per-sample losses on the device, samples, skipped steps).

    A step the fp16 GradScaler skips (inf/NaN gradients) still uses its batch. Skips are counted from
    the steps the optimizer took (a step hook, no host sync), so a disabled scaler always counts 0.
    """
    model.train()
    loss_sum, count, steps, taken = torch.zeros(()), 0, 0, []
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
        count += labels.shape[0]
    hook.remove()
    return loss_sum, count, steps - len(taken)


@torch.inference_mode()
def evaluate(
    model: nn.Module, image_set: ImageSet, img_size: int, batch_size: int, precision: str
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
    model, data: DataBundle, img_size, batch_size, precision, evaluate_test, subset: int | None = None
) -> dict:
    """{'val_loss', 'val_acc'[, 'test_loss', 'test_acc']} of the model as it is, on the full splits or,
    with `subset`, on their fixed stratified subsets of about that many images (DataBundle.eval_subset)."""
    row = {}
    for split in ("val", "test") if evaluate_test else ("val",):
        image_set = getattr(data, split) if subset is None else data.eval_subset(split, subset)
        result = evaluate(model, image_set, img_size, batch_size, precision)
        row[f"{split}_loss"], row[f"{split}_acc"] = result["loss"], result["acc"]
    return row


def eval_steps(total: int, points: int) -> list[int]:
    """The steps (or rounds), counted from 1, after which a run evaluates: `points` evenly spaced, the last
    always. Earlier ones use the evaluation subsets; the last one the full splits, for every reported or
    selecting number."""
    points = min(points, total)
    return [-(-k * total // points) for k in range(1, points + 1)]


def summarize(rows: list[dict], timing: list[dict], precision: str, device) -> dict:
    """summary.json: the final evaluated row's values, the best validation accuracy, wall time."""
    evaluated = [r for r in rows if "val_acc" in r]
    best = max(evaluated, key=lambda r: r["val_acc"])
    summary = {f"final_{k}": v for k, v in evaluated[-1].items() if k not in ("epoch", "round", "clients")}
    summary.update(
        best_val_acc=best["val_acc"],
        best_val_at=best.get("epoch", best.get("round")),
        wall_s=timing[-1]["wall_s"],
        precision=precision,
        device=str(device),
    )
    return summary


def training_batches(image_set: ImageSet, img_size: int, batch_indices, generator):
    """Augmented (inputs, labels) for each index tensor, built lazily on the device."""
    for index in batch_indices:
        yield make_batch(image_set, index, img_size, generator)


def make_optimizer(
    params: list[torch.nn.Parameter],
    names: list[str],
    masks: dict | None,
    lr: float,
    momentum: float,
    weight_decay: float,
    max_grad_norm: float | None = None,
) -> SparseSGDM:
    """SGD with momentum over `params` (named `names`); masked entries never move."""
    aligned = [masks.get(n) for n in names] if masks else None
    return SparseSGDM(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        masks=aligned,
        max_grad_norm=max_grad_norm,
    )


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


def checked_run(
    ws,
    data: DataBundle,
    config,
    eval_batch_size: int,
    checkpoint_every: int | None,
    checkpoint_minutes: float,
) -> Run:
    """The run of `config`, after the checks every runner makes before any compute (no folder yet)."""
    check_run_options(eval_batch_size, checkpoint_every, checkpoint_minutes)
    data.check_is(config.dataset)
    return run_folder(ws, config)


def run_folder(ws, config) -> Run:
    """The run of a centralized or FedAvg config in the run store, named by the config."""
    return ws.run(config.run_name(), config.to_dict())


def check_run_options(eval_batch_size=256, checkpoint_every=None, checkpoint_minutes=15) -> None:
    """The options every runner takes besides the config (notebook parameters of the same names)."""
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every, minimum=1)
    check_float("checkpoint_minutes", checkpoint_minutes, 0.0, None, low_open=True)


def run_centralized(
    ws,
    data: DataBundle,
    config: CentralizedConfig,
    *,
    eval_batch_size: int = 256,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float = 15,
    save_weights: bool = False,
    progress: bool = True,
) -> RunResult:
    """Fine-tune centrally for `config.epochs`, resuming from a checkpoint; a complete run is read back.

    Checkpoints: every `checkpoint_every` epochs, or with None after `checkpoint_minutes` of wall time
    (runs.CheckpointSchedule)."""
    run = checked_run(ws, data, config, eval_batch_size, checkpoint_every, checkpoint_minutes)
    if run.is_complete:
        return read_complete(run)
    with run:
        if run.is_complete:  # finished by another process between the check above and taking its lock
            return read_complete(run)
        schedule = CheckpointSchedule(checkpoint_every, checkpoint_minutes)
        return train_centralized(ws, data, config, run, eval_batch_size, schedule, save_weights, progress)


def train_centralized(ws, data, config, run, eval_batch_size, schedule, save_weights, progress):
    device, img_size = data.device, models.input_size(config.model, config.img_size)
    precision = models.resolve_precision(config.precision, device)
    model = ws.build_model(config.model, data.num_classes, config.seed, img_size).to(device)
    cache = head_cache_path(
        ws.root,
        config.finetune,
        model=config.model,
        weights=ws.weights_path,
        dataset=config.dataset,
        seed=config.seed,
        centralized=True,
        img_size=img_size,
        precision=precision,
    )
    prepared: Prepared = prepare(
        run,
        model,
        data,
        config.finetune,
        config.seed,
        img_size,
        precision,
        [np.arange(len(data.train))],
        cache,
    )
    named = dict(model.named_parameters())
    params = [named[n] for n in prepared.trainable_names]
    optimizer = make_optimizer(
        params,
        prepared.trainable_names,
        prepared.masks,
        config.lr,
        config.momentum,
        config.weight_decay,
        config.finetune.max_grad_norm,
    )
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    scheduler = make_scheduler(
        optimizer,
        config.scheduler,
        config.epochs * steps_per_epoch,
        round(config.warmup_epochs * steps_per_epoch),
    )
    scaler = models.grad_scaler(device, precision)
    parts = {"scheduler": scheduler, "scaler": scaler}
    # A sparse run checkpoints only the entries its masks let change (sparse_state), a dense one everything.
    moving = moving_entries(prepared.trainable_names, params, prepared.masks)
    if moving is None:
        parts.update(model=model, optimizer=optimizer)
    # Carried from row to row (and through checkpoints): the train loss sum, samples and train seconds since
    # the last evaluation row, and the run's wall seconds so far.
    rows, timing, start, carry = [], [], 0, {"loss": 0.0, "samples": 0, "train_s": 0.0, "wall_s": 0.0}
    checkpoint = run.load_checkpoint(map_location=device)
    if checkpoint is not None:
        for key, part in parts.items():
            part.load_state_dict(checkpoint.state[key])
        if moving is not None:
            load_sparse_state(checkpoint.state["sparse"], params, optimizer, moving)
        rows, timing, start = checkpoint.rows, checkpoint.timing, checkpoint.step
        carry = checkpoint.state["carry"]
    total = config.epochs * steps_per_epoch
    points = eval_steps(total, config.eval_points)
    bar = tqdm(
        range(start, config.epochs),
        desc=f"centralized {run.dir.name}",
        initial=start,
        total=config.epochs,
        disable=not progress,
    )
    for epoch in bar:
        clock, first, done = time.perf_counter(), epoch * steps_per_epoch, 0
        batches = training_batches(
            data.train,
            img_size,
            epoch_batches(len(data.train), config.batch_size, config.seed, "epoch", epoch, device=device),
            augmentation_generator(config.seed, "epoch", epoch, device=device),
        )
        cuts = [p - first for p in points if first < p <= first + steps_per_epoch]  # this epoch's evaluations
        for cut in cuts + ([steps_per_epoch] if cuts[-1:] != [steps_per_epoch] else []):
            loss_sum, count, _ = train_steps(
                model, optimizer, scaler, islice(batches, cut - done), precision, scheduler
            )
            carry["loss"], carry["samples"] = carry["loss"] + loss_sum.item(), carry["samples"] + count
            done = cut
            trained = time.perf_counter()
            carry["train_s"] += trained - clock
            if cut in cuts:
                row = {
                    "epoch": (first + cut) / steps_per_epoch,
                    "lr": scheduler.get_last_lr()[0],
                    "train_loss": carry["loss"] / carry["samples"],
                    **evaluate_splits(
                        model,
                        data,
                        img_size,
                        eval_batch_size,
                        precision,
                        config.evaluate_test,
                        None if first + cut == total else config.eval_subset,
                    ),
                }
                rows.append(row)
                carry["wall_s"] += time.perf_counter() - clock
                timing.append(
                    {
                        "epoch": row["epoch"],
                        "train_s": carry["train_s"],
                        "eval_s": time.perf_counter() - trained,
                        "wall_s": carry["wall_s"],
                    }
                )
                carry.update(loss=0.0, samples=0, train_s=0.0)
                bar.set_postfix(train_loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_acc']:.3f}")
            else:
                carry["wall_s"] += trained - clock
            clock = time.perf_counter()
        if epoch + 1 < config.epochs and schedule.due(epoch + 1):
            state = {**{key: part.state_dict() for key, part in parts.items()}, "carry": carry}
            if moving is not None:
                state["sparse"] = sparse_state(params, optimizer, moving)
            run.save_checkpoint(Checkpoint(epoch + 1, state, rows, timing))
    summary = {**summarize(rows, timing, precision, device), **prepared.info}
    if save_weights:
        run.save_artifact("model.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    run.finish(summary, rows, timing)
    return RunResult(run, summary, run.metrics())
