"""Throughput benchmark of every hot path, on this machine.

    python -m fedta_utils.bench                 # tiny_vit on a CPU, dino_vits16 at 224 on a GPU
    python -m fedta_utils.bench --quick         # the shortest form (used by the tests)
    python -m fedta_utils.bench --model dino_vits16 --batch-size 32 --csv bench.csv
    python -m fedta_utils.bench --precision fp32 --attention manual --compile   # the levers, one at a time

Random weights and synthetic data (same shapes and FLOPs as the real run; the
machine needs no internet). Each figure is the best of a few timed
repetitions (2 with --quick, else 3) after an untimed warm-up (where
--compile compiles), with the device synchronised only around a timed block,
never inside the loop being measured:

    train_step        bare training step (forward, backward, SGD-momentum step), images/s
    fedavg_round      a real FedAvg round (weight loading, fresh optimizer, data path,
                      J local steps, delta statistics, aggregation), images/s, and its
                      ratio to the bare step
    evaluation        inference on a split, images/s
    data_path         index -> crop/flip -> normalise -> resize alone, as a share of the step
    fisher            per-sample squared gradients: hooks and vmap vs a per-sample loop
    sparse_step       SparseSGDM.step (90 % frozen) vs torch.optim.SGD.step, with the
                      foreach (multi-tensor) and the for-loop implementations

The header and the CSV state the device, precision, model, input size, batch
size, attention kernel, torch.compile, CPU threads, and how busy the machine's
CPUs were just before the run (from /proc/stat, over one second), so a figure
never travels without how it was measured. Figures taken while other
processes kept the CPUs busy are not results: on a 2-core machine one busy
neighbour can slow a step several times.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from . import models
from .data import DataBundle, augmentation_generator, make_batch, synthetic_cifar100
from .optim import SparseSGDM
from .precision import PRECISIONS, autocast, grad_scaler, resolve_precision
from .sensitivity import fisher_sums
from .workspace import resolve_device

ATTENTION = ("fused", "manual")  # timm's F.scaled_dot_product_attention path, or its explicit softmax(QK^T)V
SPARSITY = 0.9  # fraction of entries frozen in the SparseSGDM measurement


@dataclass
class BenchSettings:
    model: str
    device: torch.device
    precision: str             # fp32 | bf16 | fp16 (resolved, never 'auto')
    batch_size: int            # images per training step (FedAvg's B)
    repeats: int               # timed repetitions of each measurement (the best is kept)
    steps: int                 # training / optimizer steps per timed repetition
    local_steps: int           # FedAvg's J
    clients_per_round: int     # clients trained in the measured round
    fisher_samples: int        # samples scored per Fisher measurement
    eval_images: int           # images per evaluation pass
    eval_batch_size: int = 256
    attention: str = "fused"
    compile: bool = False      # wrap the model in torch.compile (train step, FedAvg, evaluation)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(function, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Best wall time of `function()` over `repeats` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def synthetic_bundle(device: torch.device, train: int, test: int) -> DataBundle:
    """A synthetic DataBundle on `device` (no split file needed for a benchmark)."""
    train_set, test_set = synthetic_cifar100(train, test)
    half = len(test_set) // 2
    return DataBundle("synthetic", train_set.to(device), test_set.subset(range(half)).to(device),
                      test_set.subset(range(half, len(test_set))).to(device), 100)


def set_attention(model: torch.nn.Module, attention: str) -> torch.nn.Module:
    """Select timm's attention kernel in every block: fused SDPA or the explicit softmax(QK^T)V."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = attention == "fused"
    return model


def random_model(settings: BenchSettings) -> torch.nn.Module:
    model = models.build_model(settings.model, 100, pretrained=False).to(settings.device)
    return set_attention(model, settings.attention)


def maybe_compile(model: torch.nn.Module, settings: BenchSettings) -> torch.nn.Module:
    """torch.compile(model) with --compile; compilation happens in the untimed warm-up."""
    return torch.compile(model) if settings.compile else model


# --------------------------------------------------------------------------- measurements

def measure_train_step(settings: BenchSettings) -> float:
    """Seconds per bare training step on a batch already at the model's input size."""
    model = random_model(settings)
    forward = maybe_compile(model, settings)
    size = models.input_size(settings.model)
    inputs = torch.randn(settings.batch_size, 3, size, size, device=settings.device)
    labels = torch.randint(0, 100, (settings.batch_size,), device=settings.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = grad_scaler(settings.device, settings.precision)

    def steps():
        for _ in range(settings.steps):
            with autocast(settings.device, settings.precision):
                loss = F.cross_entropy(forward(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return best_time(steps, settings.device, settings.repeats) / settings.steps


def measure_fedavg_round(settings: BenchSettings) -> tuple[float, int]:
    """(seconds, images) of one FedAvg round without evaluation, through the real engine."""
    from .federated import FedAvgConfig, _FedAvgTrainer
    from .sharding import iid_shards
    from .workspace import setup_workspace

    clients = settings.clients_per_round
    data = synthetic_bundle(settings.device, train=max(4000, clients * settings.batch_size * 2), test=200)
    config = FedAvgConfig(dataset="synthetic", model=settings.model, num_clients=clients, participation=1.0,
                          local_steps=settings.local_steps, rounds=1000, batch_size=settings.batch_size,
                          precision=settings.precision, eval_every=1000)
    shards = iid_shards(data.train_labels_numpy(), clients, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        ws = setup_workspace("smoke", folder, device=str(settings.device), download=False)
        ws.pretrained = False  # no download in a benchmark: random weights, the same FLOPs
        run = ws.run("bench", "fedavg", config.to_dict())
        with run:
            trainer = _FedAvgTrainer(ws, data, config, run, shards, eval_batch_size=settings.eval_batch_size)
            set_attention(trainer.model, settings.attention)
            trainer.model = maybe_compile(trainer.model, settings)  # shares the parameters FedAvg loads
            counter = iter(range(10_000))
            seconds = best_time(lambda: trainer.round(next(counter)), settings.device, settings.repeats)
    images = clients * settings.local_steps * min(settings.batch_size, len(shards[0]))
    return seconds, images


def measure_evaluation(settings: BenchSettings) -> float:
    """Seconds per evaluated image (inference, no augmentation)."""
    from .training import evaluate

    model = maybe_compile(random_model(settings), settings)
    data = synthetic_bundle(settings.device, train=200, test=2 * settings.eval_images)
    size = models.input_size(settings.model)
    seconds = best_time(lambda: evaluate(model, data.test, size, settings.eval_batch_size, settings.precision),
                        settings.device, settings.repeats)
    return seconds / len(data.test)


def measure_data_path(settings: BenchSettings) -> float:
    """Seconds per training batch spent in index -> augment -> normalise -> resize."""
    data = synthetic_bundle(settings.device, train=4000, test=100)
    size = models.input_size(settings.model)
    generator = augmentation_generator(0, 0, device=settings.device)
    index = torch.arange(settings.batch_size, device=settings.device)

    def batches():
        for _ in range(settings.steps):
            make_batch(data.train, index, size, generator)

    return best_time(batches, settings.device, settings.repeats) / settings.steps


def measure_fisher(settings: BenchSettings, method: str) -> float:
    """Seconds per sample of per-sample squared gradients with `method`."""
    model = random_model(settings)
    size = models.input_size(settings.model)
    inputs = torch.randn(settings.fisher_samples, 3, size, size, device=settings.device)
    labels = torch.randint(0, 100, (settings.fisher_samples,), device=settings.device)
    batches = [(inputs, labels)]
    names = models.backbone_parameter_names(model)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.precision]

    def score():
        generator = torch.Generator(device=settings.device).manual_seed(0)
        fisher_sums(model, batches, "sampled", names, generator=generator, method=method, chunk_size=32,
                    autocast_dtype=dtype if method != "loop" else None)

    return best_time(score, settings.device, max(1, settings.repeats - 1)) / settings.fisher_samples


def measure_optimizer_steps(settings: BenchSettings, foreach: bool) -> tuple[float, float]:
    """(SGD.step, SparseSGDM.step at SPARSITY) seconds, gradients already in place, same `foreach`.

    Timed in alternation, so a change in the machine's load hits both alike.
    """
    model = random_model(settings)
    params = list(model.parameters())
    generator = torch.Generator(device=settings.device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, device=settings.device)
    masks = [torch.rand(p.shape, generator=generator, device=settings.device) >= SPARSITY for p in params]
    options = dict(lr=1e-3, momentum=0.9, weight_decay=5e-5, foreach=foreach)
    dense = torch.optim.SGD(params, **options)
    sparse = SparseSGDM(params, masks=masks, **options)

    def repeat(optimizer):
        return lambda: [optimizer.step() for _ in range(settings.steps)]

    times = {"sgd": [], "sparse": []}
    for _ in range(settings.repeats):
        times["sgd"].append(best_time(repeat(dense), settings.device, 1))
        times["sparse"].append(best_time(repeat(sparse), settings.device, 1))
    return min(times["sgd"]) / settings.steps, min(times["sparse"]) / settings.steps


# --------------------------------------------------------------------------- the table

def run_benchmark(settings: BenchSettings) -> pd.DataFrame:
    """Every measurement as rows: metric, value, unit, note."""
    step = measure_train_step(settings)
    round_seconds, round_images = measure_fedavg_round(settings)
    evaluation = measure_evaluation(settings)
    data_path = measure_data_path(settings)
    loop = measure_fisher(settings, "loop")
    hooks = measure_fisher(settings, "hooks")
    vmap = measure_fisher(settings, "vmap")
    bare = settings.batch_size / step
    fedavg = round_images / round_seconds
    rows = [
        ("train_step", bare, "images/s", f"batch {settings.batch_size}, SGD momentum"),
        ("fedavg_round", fedavg, "images/s",
         f"{settings.clients_per_round} clients x J={settings.local_steps} x B={settings.batch_size}, no eval"),
        ("fedavg_over_bare_step", fedavg / bare, "ratio", "target >= 0.9 on a GPU, >= 0.85 on a CPU"),
        ("evaluation", 1.0 / evaluation, "images/s", f"batch {settings.eval_batch_size}, no augmentation"),
        ("data_path_share", data_path / step, "fraction of step", "crop+flip, normalise, resize; target <= 0.05"),
        ("fisher_loop", 1.0 / loop, "samples/s", "one backward pass per sample"),
        ("fisher_hooks", 1.0 / hooks, "samples/s", "per-layer activations x output gradients"),
        ("fisher_vmap", 1.0 / vmap, "samples/s", "torch.func vmap(grad), chunks of 32"),
        ("fisher_hooks_speedup", loop / hooks, "ratio", "target >= 5 on a GPU, >= 1.5 on a CPU"),
        ("fisher_vmap_speedup", loop / vmap, "ratio", "vs the per-sample loop"),
    ]
    for foreach, label in ((True, "foreach"), (False, "for-loop")):
        sgd, sparse = measure_optimizer_steps(settings, foreach)
        suffix = "" if foreach else "_forloop"
        rows += [
            (f"sgd_step_ms{suffix}", sgd * 1e3, "ms", f"torch.optim.SGD.step, {label}, all parameters"),
            (f"sparse_sgdm_step_ms{suffix}", sparse * 1e3, "ms",
             f"SparseSGDM.step, {label}, {SPARSITY:.0%} of entries frozen"),
            (f"sparse_over_sgd_step{suffix}", sparse / sgd, "ratio", f"{label}; target <= 1.10"),
        ]
    return pd.DataFrame(rows, columns=["metric", "value", "unit", "note"])


def cpu_busy_percent(seconds: float = 1.0) -> float | None:
    """Share of all CPUs' time spent busy over the next `seconds` (Linux /proc/stat; None elsewhere)."""
    def sample():
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0)), 1)


def setup_columns(settings: BenchSettings) -> dict:
    """How the figures were measured, as CSV columns."""
    device = settings.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": device.type, "device_name": name, "precision": settings.precision, "model": settings.model,
            "input_size": models.input_size(settings.model), "batch_size": settings.batch_size,
            "attention": settings.attention, "compile": settings.compile, "cpu_threads": torch.get_num_threads(),
            "cpu_busy_before_pct": cpu_busy_percent(), "load_average": round(os.getloadavg()[0], 2),
            "torch": torch.__version__}


def describe(settings: BenchSettings, columns: dict | None = None) -> str:
    """One header line: device, precision, model, batch size, levers and load."""
    s = columns or setup_columns(settings)
    size = s["input_size"]
    busy = "n/a" if s["cpu_busy_before_pct"] is None else f"{s['cpu_busy_before_pct']:.0f} %"
    return (f"device: {s['device']} ({s['device_name']}, {s['cpu_threads']} CPU threads, CPUs busy before: {busy}) "
            f"| model: {s['model']} at {size}x{size} | precision: {s['precision']} | batch: {s['batch_size']} "
            f"| attention: {s['attention']} | compile: {'on' if s['compile'] else 'off'} | torch {s['torch']}")


def default_settings(model: str | None, device: str, batch_size: int, quick: bool, precision: str = "auto",
                     attention: str = "fused", compile: bool = False, eval_batch_size: int = 256) -> BenchSettings:
    device = resolve_device(device)
    model = model or ("dino_vits16" if device.type == "cuda" else "tiny_vit")
    return BenchSettings(
        model=model, device=device, precision=resolve_precision(precision, device), batch_size=batch_size,
        repeats=2 if quick else 3, steps=2 if quick else 10, local_steps=2 if quick else 4,
        clients_per_round=2 if quick else 10, fisher_samples=8 if quick else 32, eval_images=256 if quick else 1024,
        eval_batch_size=eval_batch_size, attention=attention, compile=compile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedta_utils.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=models.MODELS, help="default: dino_vits16 on a GPU, tiny_vit on a CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (FedAvg's B)")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="images per evaluation batch")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 on Ampere+, fp16 + GradScaler on a T4, fp32 on a CPU")
    parser.add_argument("--attention", choices=ATTENTION, default="fused",
                        help="fused: F.scaled_dot_product_attention (timm's default); manual: softmax(QK^T)V")
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile (slow warm-up)")
    parser.add_argument("--quick", action="store_true", help="the shortest form: few steps, few clients")
    parser.add_argument("--csv", type=Path, help="where to write the table (default: results/bench/<device>-<model>.csv)")
    args = parser.parse_args(argv)
    settings = default_settings(args.model, args.device, args.batch_size, args.quick, args.precision,
                                args.attention, args.compile, args.eval_batch_size)
    columns = setup_columns(settings)  # how busy the CPUs are before the benchmark loads them itself
    print(describe(settings, columns), flush=True)
    started = time.perf_counter()
    table = run_benchmark(settings)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"benchmark time: {time.perf_counter() - started:.1f} s")
    path = args.csv or Path("results") / "bench" / f"{settings.device.type}-{settings.model}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.assign(**columns).to_csv(path, index=False)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
