"""Mixed precision chosen from the hardware.

bf16 where the GPU computes it natively (Ampere and newer: compute capability
>= 8.0), fp16 with a GradScaler on older GPUs such as Colab's T4 (7.5), and
plain fp32 on a CPU. torch.cuda.is_bf16_supported() is not used because it
also answers True for emulated bf16, which is slow on a T4.
"""

from __future__ import annotations

import contextlib

import torch

from .checks import check_choice

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' | 'fp16' | 'fp32' for `device`; explicit choices pass through."""
    check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def autocast(device: torch.device | str, precision: str):
    """A context manager for the forward pass under `precision` ('fp32' does nothing)."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
