"""Gradient-mask utilities: counting, per-parameter tables, overlap, compact storage.

A mask is a bool tensor shaped like its parameter: True = the entry is
updated (trainable), False = frozen (DESIGN.md). Mask dicts are keyed by
`model.named_parameters()` names. Sparsity is the fraction of entries frozen;
density = 1 - sparsity.

Masks of ViT-S/16 hold ~21.7M entries (21.7 MB as bool); `pack_masks` stores
them as bits (~2.7 MB) in a form `torch.load(weights_only=True)` accepts, so
they can sit in run checkpoints and be shipped to federated clients cheaply.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import torch
from torch import nn

from .models import backbone_parameter_names

BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")  # timm ViT: 'blocks.3.attn.qkv.weight'


def count_trainable(masks: dict[str, torch.Tensor]) -> int:
    """Number of trainable (True) entries over all masks."""
    return sum(int(mask.sum()) for mask in masks.values())


def count_entries(masks: dict[str, torch.Tensor]) -> int:
    """Number of entries over all masks."""
    return sum(mask.numel() for mask in masks.values())


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of entries frozen (False) over all masks."""
    total = count_entries(masks)
    if total == 0:
        raise ValueError("masks hold no entries; sparsity is undefined")
    return 1.0 - count_trainable(masks) / total


def parse_block(name: str) -> tuple[int, str]:
    """(block index, name without 'blocks.N.'); (-1, name) outside the transformer blocks."""
    match = BLOCK_NAME.match(name)
    if match is None:
        return -1, name
    return int(match.group(1)), match.group(2)


def mask_density_by_parameter(masks: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per mask: parameter, entries, trainable, density, block, kind.

    block is the transformer block index parsed from 'blocks.N.' (-1 for
    parameters outside the blocks); kind is the name without that prefix
    (e.g. 'attn.qkv.weight'), so rows group by layer type across blocks.
    """
    rows = []
    for name, mask in masks.items():
        entries = mask.numel()
        trainable = int(mask.sum())
        block, kind = parse_block(name)
        density = trainable / entries if entries else math.nan
        rows.append(dict(parameter=name, entries=entries, trainable=trainable, density=density,
                         block=block, kind=kind))
    columns = ["parameter", "entries", "trainable", "density", "block", "kind"]
    return pd.DataFrame(rows, columns=columns)


def jaccard(masks_a: dict[str, torch.Tensor], masks_b: dict[str, torch.Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| of the trainable entries; 1.0 when both have none."""
    _check_same_layout(masks_a, masks_b)
    intersection = union = 0
    for name, mask_a in masks_a.items():
        mask_b = masks_b[name].to(mask_a.device)
        intersection += int((mask_a & mask_b).sum())
        union += int((mask_a | mask_b).sum())
    return 1.0 if union == 0 else intersection / union


def _check_same_layout(masks_a, masks_b) -> None:
    if set(masks_a) != set(masks_b):
        only_a, only_b = sorted(set(masks_a) - set(masks_b)), sorted(set(masks_b) - set(masks_a))
        raise ValueError(f"the masks cover different parameters: only in the first {only_a}, "
                         f"only in the second {only_b}")
    wrong = [n for n in masks_a if masks_a[n].shape != masks_b[n].shape]
    if wrong:
        raise ValueError(f"the masks have different shapes for {wrong}")


def all_true_masks(model: nn.Module, param_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """All-trainable masks (dense fine-tuning) for `param_names` (default: all but the head)."""
    names = backbone_parameter_names(model) if param_names is None else list(param_names)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"param_names has names that are not parameters of the model: {unknown}")
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}


def pack_masks(masks: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Bit-packed masks: {name: {'shape': [ints], 'bits': uint8 tensor}}, 8x smaller than bool.

    Only tensors, lists, ints and strings, so torch.load(weights_only=True) reads it back.
    """
    packed = {}
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise ValueError(f"mask {name!r} has dtype {mask.dtype}; masks are bool tensors")
        bits = np.packbits(mask.detach().cpu().numpy().reshape(-1))
        packed[name] = {"shape": [int(size) for size in mask.shape], "bits": torch.from_numpy(bits)}
    return packed


def unpack_masks(packed: dict[str, dict], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The bool masks stored by `pack_masks`, on `device`."""
    masks = {}
    for name, entry in packed.items():
        shape = [int(size) for size in entry["shape"]]
        numel = math.prod(shape)
        bits = entry["bits"]
        if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
            raise ValueError(f"packed mask {name!r} has {bits.numel()} {bits.dtype} bytes; "
                             f"shape {shape} needs {(numel + 7) // 8} uint8 bytes")
        flat = np.unpackbits(bits.cpu().numpy(), count=numel).astype(bool)
        masks[name] = torch.from_numpy(flat).reshape(shape).to(device)
    return masks
