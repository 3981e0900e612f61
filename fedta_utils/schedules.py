"""Learning-rate schedules, stepped once per optimizer step.

cosine: linear warm-up then cosine annealing to zero (Loshchilov & Hutter, 2017);
step: warm-up then x0.1 at 50 % and 75 % of training;
constant: warm-up then flat.
Each is a multiplier of the base learning rate, so the same function serves
the centralized loop (per step) and FedAvg's client learning rate (per round).
"""

from __future__ import annotations

import math

import torch

from .checks import check_choice, check_int

SCHEDULERS = ("cosine", "step", "constant")
STEP_MILESTONES = (0.5, 0.75)  # fractions of training after which the rate drops
STEP_GAMMA = 0.1


def lr_multiplier(scheduler: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The factor applied to the base learning rate at `step` (0-based) of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    drops = sum(progress >= milestone for milestone in STEP_MILESTONES)
    return STEP_GAMMA ** drops


def make_scheduler(optimizer: torch.optim.Optimizer, scheduler: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that follows lr_multiplier; its state_dict() checkpoints the step."""
    check_choice("scheduler", scheduler, SCHEDULERS)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0, maximum=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(scheduler, step, total_steps, warmup_steps))
