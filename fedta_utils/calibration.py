"""The dry-run's calibration: how long a training step, an evaluation and a Fisher sample take here.

    unit, where = unit_seconds("dino_vits16")   # seconds per trained image, evaluated image, Fisher sample

`pipeline --dry-run` turns these into the study's hours; `bench` reports them beside its other
figures. Random weights and random inputs at the model's input size: the same FLOPs as the real
run. Each figure is the best of a few timed repetitions after an untimed warm-up, the device
synchronised only around a timed block.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from . import models
from .fisher import fisher_sums
from .training import train_steps
from .workspace import resolve_device


def best_time(function, device: torch.device, repeats: int) -> float:
    """Best wall time of `function()` over `repeats` runs, after one untimed warm-up."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """Peak GPU memory since the last reset, as a note ('' on a CPU)."""
    return f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB" if device.type == "cuda" else ""


def random_model(name: str, device, img_size: int | None = None) -> torch.nn.Module:
    return models.build_model(name, pretrained=False, img_size=img_size).to(device)  # 100 classes


def random_setup(name: str, device, images: int, img_size: int | None = None) -> tuple:
    """(random model, `images` random inputs at its input size `img_size` (None: native), random labels)."""
    size = models.input_size(name, img_size)
    model = random_model(name, device, size)
    inputs = torch.randn(images, 3, size, size, device=device)
    labels = torch.randint(0, 100, (images,), device=device)
    return model, inputs, labels


def sampled_fisher(function, model, inputs: torch.Tensor) -> dict:
    """The Fisher sums of `function` (fisher_sums or fisher_sums_loop) over the backbone at `inputs`,
    labels sampled from the model by a generator seeded 0."""
    generator = torch.Generator(inputs.device).manual_seed(0)
    names = models.backbone_parameter_names(model)
    sums, _ = function(model, [(inputs, None)], "sampled", names, generator=generator)
    return sums


def train_step_seconds(
    name, device, precision, batch_size, *, steps, repeats, compile_model=False, img_size=None
) -> float:
    """Seconds per bare training step on a batch already at the input size (None: the model's native)."""
    reset_peak(device)
    model, inputs, labels = random_setup(name, device, batch_size, img_size)
    forward = torch.compile(model) if compile_model else model
    batches = [(inputs, labels)] * steps
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = models.grad_scaler(device, precision)
    seconds = best_time(
        lambda: train_steps(forward, optimizer, scaler, batches, precision=precision), device, repeats
    )
    return seconds / steps


def evaluation_seconds(
    name, device, precision, images: int, *, batch_size: int, repeats: int, img_size=None
) -> float:
    """Seconds per evaluated image (inference under autocast, no augmentation)."""
    reset_peak(device)
    model, inputs, _ = random_setup(name, device, images, img_size)
    model.eval()

    @torch.inference_mode()
    def evaluate():
        for chunk in inputs.split(batch_size):
            with models.autocast(device, precision):
                model(chunk)

    return best_time(evaluate, device, repeats) / images


def fisher_seconds(name, device, samples, function, *, img_size=None) -> tuple[float, str]:
    """(seconds per sample, peak GPU memory note) of `function`: the vectorised Fisher (fisher_sums) or its
    per-sample loop (fisher_sums_loop)."""
    model, inputs, _ = random_setup(name, device, samples, img_size)
    reset_peak(device)
    seconds = best_time(lambda: sampled_fisher(function, model, inputs), device, 1)
    return seconds / samples, peak_memory(device)


def unit_seconds(
    name: str,
    precision: str = "auto",
    eval_batch_size: int = 256,
    device: str = "auto",
    *,
    img_size: int | None = None,
) -> tuple[dict, str]:
    """Seconds per trained image, evaluated image and Fisher sample here at `img_size` (None: native).

    The dry-run's calibration; the text returned says where and at what size it was measured.
    """
    size = models.input_size(name, img_size)
    device = resolve_device(device)
    precision = models.resolve_precision(precision, device)
    slow = device.type == "cpu" and size >= 160  # ViT-S/16 (or a big grid) on a CPU: seconds per step
    batch = 32
    steps = 1 if slow else 5
    repeats = 1 if slow else 2
    step = train_step_seconds(name, device, precision, batch, steps=steps, repeats=repeats, img_size=size)
    train = step / batch  # per image
    evaluation = evaluation_seconds(
        name, device, precision, 64 if slow else 512, batch_size=eval_batch_size, repeats=1, img_size=size
    )
    fisher, _ = fisher_seconds(name, device, 8 if slow else 32, fisher_sums, img_size=size)
    return {"train": train, "eval": evaluation, "fisher": fisher}, describe(name, device, precision, size)


def describe(name, device, precision, img_size: int | None = None) -> str:
    """One line: device, CPU threads and load, model and input size, precision, torch version."""
    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return (
        f"device: {device} ({processor}, {torch.get_num_threads()} CPU threads, "
        f"load {os.getloadavg()[0]:.2f}) | model: {name} at {models.input_size(name, img_size)} px "
        f"| precision: {precision} | torch {torch.__version__}"
    )
