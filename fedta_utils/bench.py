"""Throughput benchmark of every hot path, on this machine.

    python -m fedta_utils.bench                 # tiny_vit on a CPU, dino_vits16 at 224 on a GPU
    python -m fedta_utils.bench --quick         # the shortest form (used by the tests)
    python -m fedta_utils.bench --model dino_vits16 --batch-size 32 --csv bench.csv

Random weights and synthetic data (same shapes and FLOPs as the real run; the
machine needs no internet). Each figure is the best of `--repeats` timed
repetitions after warm-up, with the device synchronised only around a timed
block, never inside the loop being measured:

    train_step        bare training step (forward, backward, SGD-momentum step), images/s
    fedavg_round      a real FedAvg round (weight loading, fresh optimizer, data path,
                      J local steps, delta statistics, aggregation), images/s, and its
                      ratio to the bare step
    evaluation        inference on a split, images/s
    data_path         index -> crop/flip -> normalise -> resize alone, as a share of the step
    fisher            per-sample squared gradients: hooks and vmap vs a per-sample loop
    sparse_step       SparseSGDM.step (90 % frozen) vs torch.optim.SGD.step
"""

from __future__ import annotations

import argparse
import contextlib
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
from .data import augmentation_generator, make_batch, synthetic_cifar100, DataBundle
from .optim import SparseSGDM
from .precision import autocast, grad_scaler, resolve_precision
from .sensitivity import fisher_sums
from .workspace import resolve_device


@dataclass
class BenchSettings:
    model: str
    device: torch.device
    precision: str
    batch_size: int
    repeats: int
    steps: int
    local_steps: int
    clients_per_round: int
    fisher_samples: int
    eval_images: int


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


def random_model(settings: BenchSettings) -> torch.nn.Module:
    return models.build_model(settings.model, 100, pretrained=False).to(settings.device)


# --------------------------------------------------------------------------- measurements

def measure_train_step(settings: BenchSettings) -> float:
    """Seconds per bare training step on a batch already at the model's input size."""
    model = random_model(settings)
    size = models.input_size(settings.model)
    inputs = torch.randn(settings.batch_size, 3, size, size, device=settings.device)
    labels = torch.randint(0, 100, (settings.batch_size,), device=settings.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = grad_scaler(settings.device, settings.precision)

    def steps():
        for _ in range(settings.steps):
            with autocast(settings.device, settings.precision):
                loss = F.cross_entropy(model(inputs), labels)
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
            trainer = _FedAvgTrainer(ws, data, config, run, shards, eval_batch_size=256)
            counter = iter(range(10_000))
            seconds = best_time(lambda: trainer.round(next(counter)), settings.device, settings.repeats)
    images = clients * settings.local_steps * min(settings.batch_size, len(shards[0]))
    return seconds, images


def measure_evaluation(settings: BenchSettings) -> float:
    """Seconds per evaluated image (inference, no augmentation)."""
    from .training import evaluate

    model = random_model(settings)
    data = synthetic_bundle(settings.device, train=200, test=2 * settings.eval_images)
    size = models.input_size(settings.model)
    seconds = best_time(lambda: evaluate(model, data.test, size, 256, settings.precision),
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
    dtype = None if settings.precision == "fp32" else {"bf16": torch.bfloat16, "fp16": torch.float16}[settings.precision]

    def score():
        generator = torch.Generator(device=settings.device).manual_seed(0)
        fisher_sums(model, batches, "sampled", names, generator=generator, method=method, chunk_size=32,
                    autocast_dtype=dtype if method != "loop" else None)

    return best_time(score, settings.device, max(1, settings.repeats - 1)) / settings.fisher_samples


def measure_optimizer_steps(settings: BenchSettings) -> tuple[float, float]:
    """(SGD.step, SparseSGDM.step at 90 % sparsity) seconds, gradients already in place."""
    model = random_model(settings)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    generator = torch.Generator(device=settings.device).manual_seed(0)
    masks = [torch.rand(p.shape, generator=generator, device=settings.device) < 0.1 for p in params]
    dense = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-5)
    sparse = SparseSGDM(params, lr=1e-3, momentum=0.9, weight_decay=5e-5, masks=masks)

    def repeat(optimizer):
        return lambda: [optimizer.step() for _ in range(settings.steps)]

    sgd = best_time(repeat(dense), settings.device, settings.repeats) / settings.steps
    sparse_time = best_time(repeat(sparse), settings.device, settings.repeats) / settings.steps
    return sgd, sparse_time


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
    sgd, sparse = measure_optimizer_steps(settings)
    bare = settings.batch_size / step
    fedavg = round_images / round_seconds
    rows = [
        ("train_step", bare, "images/s", f"batch {settings.batch_size}, SGD momentum"),
        ("fedavg_round", fedavg, "images/s",
         f"{settings.clients_per_round} clients x J={settings.local_steps} x B={settings.batch_size}, no eval"),
        ("fedavg_over_bare_step", fedavg / bare, "ratio", "target >= 0.9 on a GPU, >= 0.85 on a CPU"),
        ("evaluation", 1.0 / evaluation, "images/s", "batch 256, no augmentation"),
        ("data_path_share", data_path / step, "fraction of step", "crop+flip, normalise, resize; target <= 0.05"),
        ("fisher_loop", 1.0 / loop, "samples/s", "one backward pass per sample"),
        ("fisher_hooks", 1.0 / hooks, "samples/s", "per-layer activations x output gradients"),
        ("fisher_vmap", 1.0 / vmap, "samples/s", "torch.func vmap(grad), chunks of 32"),
        ("fisher_hooks_speedup", loop / hooks, "ratio", "target >= 5 on a GPU, >= 1.5 on a CPU"),
        ("fisher_vmap_speedup", loop / vmap, "ratio", "vs the per-sample loop"),
        ("sgd_step_ms", sgd * 1e3, "ms", "torch.optim.SGD.step, all parameters"),
        ("sparse_sgdm_step_ms", sparse * 1e3, "ms", "SparseSGDM.step, 90 % of entries frozen"),
        ("sparse_over_sgd_step", sparse / sgd, "ratio", "target <= 1.10"),
    ]
    return pd.DataFrame(rows, columns=["metric", "value", "unit", "note"])


def describe(settings: BenchSettings) -> str:
    device = settings.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return (f"device: {device.type} ({name}, {threads} CPU threads) | model: {settings.model} at "
            f"{models.input_size(settings.model)}x{models.input_size(settings.model)} | precision: {settings.precision} | "
            f"batch: {settings.batch_size} | torch {torch.__version__}")


def default_settings(model: str | None, device: str, batch_size: int, quick: bool) -> BenchSettings:
    device = resolve_device(device)
    model = model or ("dino_vits16" if device.type == "cuda" else "tiny_vit")
    return BenchSettings(
        model=model, device=device, precision=resolve_precision("auto", device), batch_size=batch_size,
        repeats=2 if quick else 3, steps=2 if quick else 10, local_steps=2 if quick else 4,
        clients_per_round=2 if quick else 10, fisher_samples=8 if quick else 32, eval_images=256 if quick else 1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedta_utils.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=models.MODELS, help="default: dino_vits16 on a GPU, tiny_vit on a CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (FedAvg's B)")
    parser.add_argument("--quick", action="store_true", help="the shortest form: few steps, few clients")
    parser.add_argument("--csv", type=Path, help="where to write the table (default: results/bench/<device>-<model>.csv)")
    args = parser.parse_args(argv)
    settings = default_settings(args.model, args.device, args.batch_size, args.quick)
    header = describe(settings)
    print(header, flush=True)
    started = time.perf_counter()
    table = run_benchmark(settings)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"benchmark time: {time.perf_counter() - started:.1f} s")
    path = args.csv or Path("results") / "bench" / f"{settings.device.type}-{settings.model}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.assign(setup=header).to_csv(path, index=False)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
