"""Throughput and correctness of every hot path on this machine: `python -m fedta_utils.bench`.

    python -m fedta_utils.bench               # tiny_vit on a CPU, DINO ViT-S/16 at 224 on a GPU
    python -m fedta_utils.bench --quick       # the shortest form (the tests run it)
    python -m fedta_utils.bench --model dino_vits16 --precision fp16 --csv bench.csv

Random weights and synthetic data: the same shapes and FLOPs as the real run, no internet. Each
figure is the best of a few timed repetitions after an untimed warm-up, the device synchronised
only around a timed block. Every row is appended to the CSV as soon as it is measured, so a run
cut short still leaves data. Rows:

    train_step_b<B>      bare training step (forward, backward, SGD-momentum step), images/s
    fedavg_round         a real FedAvg round through fedavg.client_update / server_update, images/s
    fedavg_over_bare     its ratio to the bare step (the simulation's overhead)
    evaluation           inference at the evaluation batch, images/s
    data_path_share      index -> crop/flip -> normalise -> resize, as a share of a step
    fisher_vmap / _loop  per-sample squared gradients, samples/s, and peak GPU memory
    sparse_over_sgd      SparseSGDM.step (90 % frozen) / torch.optim.SGD.step
    check_*              1 when a correctness check holds on this device (0 otherwise)

--gpu-check adds what only a GPU run can tell (the script for a lent GPU; on a CPU it runs the
same code with tiny_vit, at 32 and 16 px, and short steps): the training step in bf16 and in fp16
with a GradScaler at the native and the smaller input size (160 px for ViT-S/16), one
torch.compile'd configuration (its compile time apart), the FedSGD identity on the device, one
round of each client algorithm and merge rule beside plain FedAvg's (FedProx, SCAFFOLD on a 90 %
sparse mask, TIES, the Fisher merge: seconds and peak memory), the write and read seconds and
the bytes of a dense and a sparse FedAvg checkpoint (the run store's own save and load), the
dry-run's calibration at both sizes with the hours it gives the full profile's work, and a
rehearsal of the notebooks' code paths (a centralized epoch, 3 FedAvg rounds and a sparse FedAvg
run with 2 calibration rounds, each interrupted after its first checkpoint and resumed, compared
with an uninterrupted run). Its output is labelled a rehearsal: random weights, synthetic data.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from . import models, pipeline
from .calibration import (
    best_time,
    describe,
    evaluation_seconds,
    fisher_seconds,
    peak_memory,
    random_model,
    random_setup,
    reset_peak,
    sampled_fisher,
    train_step_seconds,
    unit_seconds,
)
from .data import ImageSet, augmentation_generator, make_batch, synthetic_cifar100
from .fedavg import FedAvgConfig, FedAvgRun, client_update, run_fedavg, server_update
from .fisher import DEFAULT_CHUNK, fisher_sums, fisher_sums_loop
from .optim import SparseSGDM
from .prepare import FineTuneSpec
from .runs import Checkpoint, Run
from .training import CentralizedConfig, load_flat, read_flat, run_centralized, run_folder, train_steps
from .workspace import resolve_device, setup_workspace

SPARSITY = 0.9  # fraction of entries frozen in the SparseSGDM measurement
# --quick or not -> (steps per timed block, timed repetitions): --quick times the least that still warms up
TIMING_LENGTHS = {True: (2, 2), False: (10, 3)}
ROUND_SHAPE = {True: (2, 2), False: (10, 4)}  # --quick or not -> (clients, J) of a timed FedAvg round
SMALL_SIZES = {"dino_vits16": pipeline.SMALL_IMG_SIZE, "tiny_vit": 16}  # priced beside the native size
SPARSE = FineTuneSpec(mask_rule="least_sensitive", calibration_rounds=1, calibration_samples=100)
ROUND_VARIANTS = {  # row label: FedAvgConfig fields
    "fedavg": {},
    "fedprox": dict(algorithm="fedprox", prox_mu=0.01),
    "ties": dict(merge_rule="ties", ties_density=0.2),
    "fisher_merge": dict(merge_rule="fisher"),
    "sparse_fedavg": dict(finetune=SPARSE),  # at SPARSE's sparsity, 0.9
    "sparse_scaffold": dict(algorithm="scaffold", finetune=SPARSE),  # a dense one is refused for ViT-S/16
}
CHECKPOINTED = ("fedavg", "sparse_fedavg")  # the variants whose checkpoint is timed


def synthetic_train(device, images: int) -> ImageSet:
    """`images` synthetic CIFAR-100 training images on `device`."""
    train_set, _ = synthetic_cifar100(images, 100)
    return train_set.to(device)


def synthetic_workspace(folder, device, images: int) -> tuple:
    """(a workspace in `folder` that builds random weights, its `images` synthetic training images)."""
    ws = setup_workspace("smoke", folder, device=str(device), download=False)
    ws.pretrained = False  # random weights: the same FLOPs, no download
    return ws, ws.load_data("synthetic", synthetic_train_size=images, synthetic_test_size=200)


@contextlib.contextmanager
def fedavg_trainer(name, device, precision, clients, local_steps, **overrides):
    """A prepared FedAvgRun of `clients` clients x J=`local_steps` x B=32 on synthetic images, with the
    FedAvgConfig fields `overrides`, in a temporary workspace whose run's lock it holds."""
    fields = dict(dataset="synthetic", model=name, precision=precision, participation=1.0)
    config = FedAvgConfig(**fields, num_clients=clients, local_steps=local_steps, **overrides)
    with tempfile.TemporaryDirectory() as folder:
        ws, data = synthetic_workspace(folder, device, max(2000, clients * local_steps * 64))
        with run_folder(ws, config) as run:
            yield FedAvgRun(ws, data, config, run, shards=config.shards(data), eval_batch_size=256)


def fedavg_round_seconds(name, device, precision, clients, *, local_steps, repeats, **overrides) -> float:
    """Seconds of one FedAvgRun.round (data path, fresh optimizers, J steps each, the merge, the server
    step), no evaluation; overrides: FedAvgConfig fields. Resets the peak GPU memory once prepared."""
    with fedavg_trainer(name, device, precision, clients, local_steps, **overrides) as trainer:
        reset_peak(device)
        rounds = itertools.count()
        return best_time(lambda: trainer.round(next(rounds)), device, repeats)


def data_path_seconds(name, device, batch_size, steps, *, repeats) -> float:
    train = synthetic_train(device, 2000)
    generator = augmentation_generator(0, device=device)
    index = torch.arange(batch_size, device=device)
    return (
        best_time(
            lambda: [make_batch(train, index, models.input_size(name), generator) for _ in range(steps)],
            device,
            repeats,
        )
        / steps
    )


def optimizer_step_ratio(name, device, steps, repeats) -> float:
    """SparseSGDM.step at SPARSITY frozen / torch.optim.SGD.step, gradients already in place."""
    params = list(random_model(name, device).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    masks = [torch.rand_like(p) >= SPARSITY for p in params]
    options = dict(lr=1e-3, momentum=0.9, weight_decay=5e-5)
    dense = torch.optim.SGD(params, **options)
    sparse = SparseSGDM(params, **options, masks=masks)
    sgd = best_time(lambda: [dense.step() for _ in range(steps)], device, repeats)
    return best_time(lambda: [sparse.step() for _ in range(steps)], device, repeats) / sgd


def correctness_checks(device) -> dict[str, bool]:
    """SparseSGDM == SGD with all-ones masks; frozen entries bit-identical under fp16/bf16; Fisher == loop."""
    model, inputs, labels = random_setup("tiny_vit", device, 8)
    params = list(model.parameters())
    batches = [(inputs, labels)] * 3
    start = read_flat(params)
    results = {}
    for precision in ("fp32", "bf16") + (("fp16",) if device.type == "cuda" else ()):
        masks = [torch.rand_like(p) < 0.5 for p in params]
        frozen = ~torch.cat([m.reshape(-1) for m in masks])  # in the layout of read_flat
        load_flat(params, start)
        optimizer = SparseSGDM(params, lr=0.1, momentum=0.9, weight_decay=1e-3, masks=masks)
        train_steps(model, optimizer, models.grad_scaler(device, precision), batches, precision=precision)
        results[f"check_frozen_exact_{precision}"] = torch.equal(read_flat(params)[frozen], start[frozen])
    trajectories = []
    ones = [torch.ones_like(p) for p in params]
    for optimizer_class, options in ((torch.optim.SGD, {}), (SparseSGDM, {"masks": ones})):
        load_flat(params, start)
        optimizer = optimizer_class(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, **options)
        train_steps(model, optimizer, models.grad_scaler(device, "fp32"), batches, precision="fp32")
        trajectories.append(read_flat(params))
    results["check_all_ones_equals_sgd"] = torch.equal(*trajectories)
    vectorised, loop = [sampled_fisher(f, model, inputs) for f in (fisher_sums, fisher_sums_loop)]
    results["check_fisher_equals_loop"] = all(
        torch.allclose(vectorised[n], loop[n], rtol=1e-3, atol=1e-9) for n in vectorised
    )
    return results


def measurements(name, device, precision, quick: bool, *, eval_batch_size: int = 256):
    """(metric, value, unit, note) rows, yielded as each is measured."""
    steps, repeats = TIMING_LENGTHS[quick]
    clients, local_steps = ROUND_SHAPE[quick]
    batches = (32,) if device.type == "cpu" else (32, 128)
    step = {}
    for batch in batches:
        step[batch] = train_step_seconds(name, device, precision, batch, steps=steps, repeats=repeats)
        yield f"train_step_b{batch}", batch / step[batch], "images/s", f"batch {batch}{peak_memory(device)}"
    round_seconds = fedavg_round_seconds(
        name, device, precision, clients, local_steps=local_steps, repeats=repeats
    )
    images = clients * local_steps * 32
    yield "fedavg_round", images / round_seconds, "images/s", f"{clients} clients x J={local_steps} x B=32"
    yield "fedavg_over_bare", images / round_seconds / (32 / step[32]), "ratio", "simulation overhead"
    evaluation = evaluation_seconds(
        name, device, precision, 256 if quick else 1024, batch_size=eval_batch_size, repeats=repeats
    )
    yield "evaluation", 1 / evaluation, "images/s", f"batch {eval_batch_size}{peak_memory(device)}"
    data_path = data_path_seconds(name, device, 32, steps, repeats=repeats)
    yield "data_path_share", data_path / step[32], "fraction of step", "crop+flip, normalise, resize"
    samples = 8 if quick else 32
    for function, label in ((fisher_sums, "fisher_vmap"), (fisher_sums_loop, "fisher_loop")):
        seconds, memory = fisher_seconds(name, device, samples, function)
        yield label, 1 / seconds, "samples/s", f"{samples} samples{memory}"
    ratio = optimizer_step_ratio(name, device, steps, repeats)
    yield "sparse_over_sgd", ratio, "ratio", f"{SPARSITY:.0%} frozen"
    for check, passed in correctness_checks(device).items():
        yield check, float(passed), "1 = holds", "on this device"


def fedsgd_identity_holds(device) -> bool:
    """C = 1, J = 1, full-shard batches, no momentum: one FedAvg round is one full-batch gradient step."""
    model, inputs, labels = random_setup("tiny_vit", device, 16)  # the union of the shards: one full batch
    params = list(model.parameters())
    start = read_flat(params)
    shards = zip(inputs.split([6, 10]), labels.split([6, 10]))
    delta_sum = torch.zeros_like(start)
    for batch in shards:
        optimizer = torch.optim.SGD(params, lr=0.1)
        update = client_update(model, params, start, [batch], optimizer=optimizer, precision="fp32")
        delta_sum.add_(update.delta, alpha=update.samples)
    fedavg = start.clone()
    server_update(fedavg, delta_sum / 16)
    load_flat(params, start)
    model.train()
    gradients = torch.autograd.grad(F.cross_entropy(model(inputs), labels), params)
    step = start - 0.1 * read_flat(gradients)
    return torch.allclose(fedavg, step, rtol=1e-4, atol=1e-6)


class Interrupted(Exception):
    """Stands for a kill right after a checkpoint (the process's state is thrown away)."""


def run_interrupted(interrupt: bool, runner, *args, **kwargs):
    """runner(...); with `interrupt`, stopped just after its first checkpoint, then run again to resume."""
    if not interrupt:
        return runner(*args, **kwargs)
    original = Run.save_checkpoint

    def save_then_stop(run, checkpoint):
        original(run, checkpoint)
        raise Interrupted

    Run.save_checkpoint = save_then_stop
    try:
        runner(*args, **kwargs)
        raise RuntimeError("the run wrote no checkpoint, so nothing was interrupted and resumed")
    except Interrupted:
        pass
    finally:
        Run.save_checkpoint = original
    return runner(*args, **kwargs)


def rehearsal_plans(name: str, quick: bool) -> list[tuple]:
    """(kind, runner, config) of each code path the rehearsal runs: a centralized run, a dense FedAvg
    run and a sparse one whose mask needs calibration rounds."""
    common = dict(dataset="synthetic", model=name)  # seed 0, precision auto, lr 0.01: the defaults
    fed = dict(
        common,
        num_clients=10,
        participation=0.3 if quick else 1.0,
        local_steps=2 if quick else 4,
        rounds=3,
        eval_points=3,
    )
    sparse = FineTuneSpec(
        head="ridge",
        mask_rule="least_sensitive",  # at the default sparsity, 0.9
        calibration_rounds=2,
        calibration_samples=100 if quick else 320,
    )
    return [
        ("centralized", run_centralized, CentralizedConfig(**common, epochs=2)),
        ("fedavg", run_fedavg, FedAvgConfig(**fed)),
        ("sparse_fedavg", run_fedavg, FedAvgConfig(**fed, finetune=sparse)),
    ]


def rehearsal_metrics(runner, config, device, images: int) -> list[pd.DataFrame]:
    """The metrics of `config` run straight through, then of `config` interrupted and resumed, each in a
    fresh workspace on `images` synthetic training images."""
    metrics = []
    for interrupt in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            ws, data = synthetic_workspace(folder, device, images)
            result = run_interrupted(interrupt, runner, ws, data, config, checkpoint_every=1, progress=False)
            metrics.append(result.metrics)
    return metrics


def compare_metrics(straight: pd.DataFrame, resumed: pd.DataFrame) -> tuple[bool, float]:
    """(the two metrics tables are equal, the largest difference between their numbers), wall times apart."""
    columns = [c for c in straight.columns if not c.endswith("_s")]  # wall times differ by nature
    a = straight[columns].select_dtypes("number").to_numpy(float)
    b = resumed[columns].select_dtypes("number").to_numpy(float)
    return straight[columns].equals(resumed[columns]), float(abs(a - b).max())


def rehearsal_rows(name, device, quick: bool):
    """A row per code path: 1 when its resumed metrics equal an uninterrupted run's; the note gives the
    largest difference and the seconds both runs took."""
    torch.use_deterministic_algorithms(True, warn_only=True)  # bit-identical where the kernels allow it
    images = 600 if quick else 5000
    for kind, runner, config in rehearsal_plans(name, quick):
        started = time.perf_counter()
        straight, resumed = rehearsal_metrics(runner, config, device, images)
        equal, difference = compare_metrics(straight, resumed)
        yield (
            f"rehearsal_{kind}_resumed_equal",
            float(equal),
            "1 = equal",
            f"rehearsal, largest difference {difference:.2e}, {time.perf_counter() - started:.0f} s",
        )


def gpu_step_rows(name, device, quick: bool):
    """Training-step rows in bf16 and in fp16 with a GradScaler (fp32 on a CPU, where neither pays) at the
    native and the smaller input size, then the torch.compile'd step, whose note gives the warm-up,
    which includes the compilation."""
    steps, repeats = TIMING_LENGTHS[quick]
    precisions = ("bf16", "fp16") if device.type == "cuda" else ("fp32",)
    batches = (32,) if quick else (32, 128)
    sizes = (models.input_size(name), SMALL_SIZES[name])
    for precision, batch, size in itertools.product(precisions, batches, sizes):
        seconds = train_step_seconds(
            name, device, precision, batch, steps=steps, repeats=repeats, img_size=size
        )
        yield (
            f"train_step_b{batch}_{precision}_{size}px",
            batch / seconds,
            "images/s",
            f"batch {batch}{peak_memory(device)}",
        )
    started = time.perf_counter()
    precision = models.resolve_precision("auto", device)
    seconds = train_step_seconds(
        name, device, precision, 32, steps=steps, repeats=repeats, compile_model=True
    )
    yield (
        "train_step_b32_compiled",
        32 / seconds,
        "images/s",
        f"torch.compile, {precision}; warm-up with compilation {time.perf_counter() - started:.0f} s",
    )


def round_rows(name, device, quick: bool):
    """Seconds and peak GPU memory of one FedAvg round of each ROUND_VARIANTS."""
    _, repeats = TIMING_LENGTHS[quick]
    clients, local_steps = ROUND_SHAPE[quick]
    shape = f"{clients} clients x J={local_steps} x B=32"
    for label, overrides in ROUND_VARIANTS.items():
        seconds = fedavg_round_seconds(
            name, device, "auto", clients, local_steps=local_steps, repeats=repeats, **overrides
        )
        yield f"round_{label}", seconds, "s", f"{shape}{peak_memory(device)}"


def checkpoint_rows(name, device):
    """Write and read seconds and bytes of a FedAvg checkpoint of each CHECKPOINTED variant, through the
    run store (Run.save_checkpoint, Run.load_checkpoint) in a temporary folder; the note gives the
    dry-run's count of its bytes (pipeline.checkpoint_bytes)."""
    for label in CHECKPOINTED:
        with fedavg_trainer(name, device, "auto", 2, 1, **ROUND_VARIANTS[label]) as trainer:
            run = trainer.run
            checkpoint = Checkpoint(1, trainer.state(), trainer.rows, trainer.timing)
            write = best_time(functools.partial(run.save_checkpoint, checkpoint), device, 1)
            read = best_time(functools.partial(run.load_checkpoint, device), device, 1)
            size = next(run.dir.glob("checkpoint-*.pt")).stat().st_size
            estimate = pipeline.checkpoint_bytes(trainer.config)
            note = f"{trainer.entries_sent:,} entries; the dry-run counts {estimate:,} bytes"
        yield f"checkpoint_{label}_write", write, "s", note
        yield f"checkpoint_{label}_read", read, "s", note
        yield f"checkpoint_{label}_bytes", size, "bytes", note


def dry_run_rows(name, device):
    """The dry-run's calibration here at the native and the smaller input size, and the hours that
    pipeline.work_seconds gives the full profile's work (pipeline.work_table) at each."""
    work = pipeline.work_table(pipeline.grids("full"))
    for size in (models.input_size(name), SMALL_SIZES[name]):
        unit, _ = unit_seconds(name, device=str(device), img_size=size)
        for kind, value in unit.items():
            yield f"dryrun_seconds_per_{kind}_{size}px", value, "s", "the dry-run's calibration"
        hours = pipeline.work_seconds(work, unit).sum() / 3600
        note = f"the full profile's {work['runs'].sum()} runs at {name}'s seconds here"
        yield f"dryrun_study_hours_{size}px", hours, "hours", note


def gpu_check(name, device, quick: bool):
    """The rows only --gpu-check measures (see the module docstring)."""
    yield from gpu_step_rows(name, device, quick)
    # The vectorised Fisher at its default chunk, whose per-sample gradients bound its memory.
    entries = sum(p.numel() for p in random_model(name, device).parameters())
    chunk_gb = DEFAULT_CHUNK * entries * 4 / 2**30  # fp32 gradients of DEFAULT_CHUNK samples at once
    seconds, memory = fisher_seconds(name, device, DEFAULT_CHUNK, fisher_sums)
    yield (
        "fisher_vmap_default_chunk",
        1 / seconds,
        "samples/s",
        f"chunk {DEFAULT_CHUNK}: bound {chunk_gb:.2f} GB of gradients + activations{memory}",
    )
    yield "check_fedsgd_identity", float(fedsgd_identity_holds(device)), "1 = holds", "on this device"
    yield from round_rows(name, device, quick)
    yield from checkpoint_rows(name, device)
    yield from dry_run_rows(name, device)
    yield from rehearsal_rows(name, device, quick)  # last: it turns deterministic algorithms on


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedta_utils.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=models.MODELS, help="default: dino_vits16 on a GPU, else tiny_vit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=models.PRECISIONS, default="auto")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="images per evaluation batch")
    parser.add_argument("--quick", action="store_true", help="the shortest form: few steps, few clients")
    parser.add_argument("--gpu-check", action="store_true", help="add the GPU-only checks and the rehearsal")
    parser.add_argument("--csv", type=Path, help="default: results/bench/<device>-<model>.csv")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    name = args.model or ("dino_vits16" if device.type == "cuda" else "tiny_vit")
    precision = models.resolve_precision(args.precision, device)
    path = args.csv or Path("results") / "bench" / f"{device.type}-{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = describe(name, device, precision)
    print(header, flush=True)
    started = time.perf_counter()
    rows = []
    extra = gpu_check(name, device, args.quick) if args.gpu_check else ()
    measured = measurements(name, device, precision, args.quick, eval_batch_size=args.eval_batch_size)
    for row in itertools.chain(measured, extra):
        rows.append(row)
        print(f"{row[0]:>38} {row[1]:12.4g} {row[2]:<18} {row[3]}", flush=True)
        frame = pd.DataFrame(rows, columns=["metric", "value", "unit", "note"])
        frame.assign(
            device=str(device), model=name, precision=precision, torch=torch.__version__, setup=header
        ).to_csv(path, index=False)
    print(f"benchmark time: {time.perf_counter() - started:.1f} s; written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
