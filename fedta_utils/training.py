"""Training and evaluation steps, and the centralized fine-tuning run.

The step loop never synchronises with the host: losses are summed on the device and read once
per epoch (or per client in FedAvg), so the GPU is never left waiting for Python. Centralized
runs are resumable per epoch: a kill at any moment loses at most the epoch in flight, and the
resumed run writes the same metrics.csv as an uninterrupted one (bit for bit on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import models
from .checks import ConfigError, check_bool, check_choice, check_float, check_int
from .data import DATASETS, DataBundle, ImageSet, augmentation_generator, epoch_batches, make_batch
from .data import sequential_batches
from .finetune import FineTuneSpec, Prepared, head_cache_path, prepare
from .optim import SCHEDULERS, SparseSGDM, make_scheduler
from .runs import Checkpoint, Run


@dataclass(frozen=True)
class CentralizedConfig:
    """Everything that determines a centralized run's numbers (its identity)."""

    dataset: str = "cifar100"
    model: str = "dino_vits16"
    seed: int = 0
    epochs: int = 10                 # passes over the 45,000-image train split
    batch_size: int = 128            # images per optimizer step
    lr: float = 0.01                 # peak learning rate (after warm-up)
    momentum: float = 0.9
    weight_decay: float = 5e-5
    scheduler: str = "cosine"        # 'cosine' | 'step' | 'constant'
    warmup_epochs: float = 0.0       # linear warm-up length, in epochs
    precision: str = "auto"          # 'auto' picks bf16 / fp16 / fp32 from the device
    evaluate_test: bool = True       # False for hyperparameter search: the test set only reports
    finetune: FineTuneSpec = field(default_factory=FineTuneSpec)  # step-0 head + sparse masks

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("model", self.model, models.MODELS)
        check_int("seed", self.seed, minimum=0)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_float("lr", self.lr, 0.0, None, low_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_float("weight_decay", self.weight_decay, 0.0, None)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_float("warmup_epochs", self.warmup_epochs, 0.0, self.epochs)
        check_choice("precision", self.precision, models.PRECISIONS)
        check_bool("evaluate_test", self.evaluate_test)
        if not isinstance(self.finetune, FineTuneSpec):
            raise ConfigError(f"finetune must be a FineTuneSpec, got {type(self.finetune).__name__}")

    def to_dict(self) -> dict:
        return {**asdict(self), "finetune": self.finetune.identity()}

    def run_name(self) -> str:
        name = f"{self.scheduler}-lr{self.lr:g}-wd{self.weight_decay:g}"
        return f"{name}{self.finetune.short_name()}-s{self.seed}"


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

def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], precision: str,
                scheduler=None) -> tuple[torch.Tensor, int]:
    """One optimizer step per batch; returns (sum of per-sample losses on the device, samples)."""
    model.train()
    loss_sum, count = torch.zeros(()), 0
    for inputs, labels in batches:
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
    return loss_sum, count


@torch.inference_mode()
def evaluate(model: nn.Module, image_set: ImageSet, img_size: int, batch_size: int,
             precision: str) -> dict[str, float]:
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


def evaluate_splits(model, data: DataBundle, img_size, batch_size, precision, evaluate_test) -> dict:
    """{'val_loss', 'val_acc'[, 'test_loss', 'test_acc']} of the model as it is."""
    row = {}
    for split in ("val", "test") if evaluate_test else ("val",):
        result = evaluate(model, getattr(data, split), img_size, batch_size, precision)
        row[f"{split}_loss"], row[f"{split}_acc"] = result["loss"], result["acc"]
    return row


def summarize(rows: list[dict], timing: list[dict], precision: str, device) -> dict:
    """summary.json: the final evaluated row's values, the best validation accuracy, wall time."""
    evaluated = [r for r in rows if "val_acc" in r]
    best = max(evaluated, key=lambda r: r["val_acc"])
    summary = {f"final_{k}": v for k, v in evaluated[-1].items() if k not in ("epoch", "round", "clients")}
    summary.update(best_val_acc=best["val_acc"], best_val_at=best.get("epoch", best.get("round")),
                   wall_s=timing[-1]["wall_s"], precision=precision, device=str(device))
    return summary


def training_batches(image_set: ImageSet, img_size: int, batch_indices, generator):
    """Augmented (inputs, labels) for each index tensor, built lazily on the device."""
    for index in batch_indices:
        yield make_batch(image_set, index, img_size, generator)


def make_optimizer(params: list[torch.nn.Parameter], names: list[str], masks: dict | None, lr: float,
                   momentum: float, weight_decay: float) -> SparseSGDM:
    """SGD with momentum over `params` (named `names`); masked entries never move."""
    aligned = [masks.get(n) for n in names] if masks else None
    return SparseSGDM(params, lr=lr, momentum=momentum, weight_decay=weight_decay, masks=aligned)


# --------------------------------------------------------------------------- centralized run

def checked_run(ws, data: DataBundle, config, experiment: str, eval_batch_size: int,
                checkpoint_every: int) -> Run:
    """The run of `config`, after the checks every runner makes before any compute (no folder yet)."""
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    check_int("checkpoint_every", checkpoint_every, minimum=1)
    data.check_is(config.dataset)
    return ws.run(experiment, config.run_name(), config.to_dict())


def run_centralized(ws, data: DataBundle, config: CentralizedConfig, *, experiment: str = "centralized",
                    eval_batch_size: int = 256, checkpoint_every: int = 1, save_weights: bool = False,
                    progress: bool = True) -> RunResult:
    """Fine-tune centrally for `config.epochs`, resuming from a checkpoint; a complete run is read back."""
    run = checked_run(ws, data, config, experiment, eval_batch_size, checkpoint_every)
    if run.is_complete:
        return read_complete(run)
    with run:
        return train_centralized(ws, data, config, run, eval_batch_size, checkpoint_every, save_weights,
                                 progress)


def train_centralized(ws, data, config, run, eval_batch_size, checkpoint_every, save_weights, progress):
    device, img_size = data.device, models.input_size(config.model)
    precision = models.resolve_precision(config.precision, device)
    model = ws.build_model(config.model, data.num_classes, head_seed=config.seed).to(device)
    cache = head_cache_path(ws.root, config.finetune, model=config.model, weights=ws.weights_path,
                            dataset=config.dataset, seed=config.seed, centralized=True)
    prepared: Prepared = prepare(run, model, data, config.finetune, config.seed, img_size, precision,
                                 [np.arange(len(data.train))], cache)
    params = dict(model.named_parameters())
    optimizer = make_optimizer([params[n] for n in prepared.trainable_names], prepared.trainable_names,
                               prepared.masks, config.lr, config.momentum, config.weight_decay)
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    scheduler = make_scheduler(optimizer, config.scheduler, config.epochs * steps_per_epoch,
                               round(config.warmup_epochs * steps_per_epoch))
    scaler = models.grad_scaler(device, precision)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    rows, timing, start = [], [], 0
    checkpoint = run.load_checkpoint(map_location=device)
    if checkpoint is not None:
        for key, part in parts.items():
            part.load_state_dict(checkpoint.state[key])
        rows, timing, start = checkpoint.rows, checkpoint.timing, checkpoint.step
    elapsed = timing[-1]["wall_s"] if timing else 0.0
    bar = tqdm(range(start, config.epochs), desc=f"centralized {run.dir.name}", initial=start,
               total=config.epochs, disable=not progress)
    for epoch in bar:
        started = time.perf_counter()
        row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0]}
        batches = epoch_batches(len(data.train), config.batch_size, config.seed, "epoch", epoch,
                                device=device)
        generator = augmentation_generator(config.seed, "epoch", epoch, device=device)
        loss_sum, count = train_steps(model, optimizer, scaler,
                                      training_batches(data.train, img_size, batches, generator),
                                      precision, scheduler)
        row["train_loss"] = loss_sum.item() / count
        trained = time.perf_counter()
        row.update(evaluate_splits(model, data, img_size, eval_batch_size, precision, config.evaluate_test))
        elapsed += time.perf_counter() - started
        rows.append(row)
        timing.append({"epoch": epoch + 1, "train_s": trained - started,
                       "eval_s": time.perf_counter() - trained, "wall_s": elapsed})
        bar.set_postfix(train_loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_acc']:.3f}")
        if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == config.epochs:
            state = {key: part.state_dict() for key, part in parts.items()}
            run.save_checkpoint(Checkpoint(epoch + 1, state, rows, timing))
    summary = {**summarize(rows, timing, precision, device), **prepared.info}
    if save_weights:
        run.save_artifact("model.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})
    run.finish(summary, rows, timing)
    return RunResult(run, summary, run.metrics())
