"""Mask rules, multi-round mask calibration (TaLoS) and mask storage.

Calibration (TaLoS Sec. 4.2, vision/prune_finetune.py of the reference code)
runs R rounds towards the final density d: round r keeps the round(d^(r/R) N)
lowest-ranked eligible entries globally (one threshold across all tensors, for
every rule: the reference code thresholds its magnitude and random rules per
tensor, which would make the scope vary with the rule);
entries frozen earlier rank +inf so they never come back; while later rounds
are scored, frozen entries are attenuated to 0.1x in the forward pass, so
the next scores are those of the partially masked network. Afterwards the
model's weights are exactly the original ones again.

Mask convention (DESIGN.md): bool tensor shaped like its parameter, True =
trainable, False = frozen; sparsity = fraction of eligible entries frozen, with
the same meaning for every rule. ViT-S/16 masks hold ~21.7 M entries (21.7 MB
as bool); `pack_masks` stores them as bits (~2.7 MB) that
torch.load(weights_only=True) reads, for checkpoints and federated clients.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import reduce
from itertools import count

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import ConfigError, check_choice, check_float, check_int
from .data import derive_seed, torch_generator
from .fisher import DEFAULT_CHUNK, LABEL_MODES, Tensors, fisher_scores, resolve_names
from .models import backbone_parameter_names

RULES = ("least_sensitive", "most_sensitive", "lowest_magnitude", "highest_magnitude", "random")
SENSITIVITY_RULES = ("least_sensitive", "most_sensitive")
KEEP_HIGHEST_RULES = ("most_sensitive", "highest_magnitude")  # ranked by the negated score
ATTENUATION = 0.1  # TaLoS: frozen entries are scaled by 0.1 in the forward of later rounds
BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")  # timm ViT: 'blocks.3.attn.qkv.weight'

ScoreFn = Callable[[nn.Module], Tensors]


@dataclass
class Calibration:
    """The outcome of `calibrate`.

    thresholds: per round, the boundary score in the rule's own units (e.g.
        least_sensitive: the largest Fisher score still trainable; nan when
        nothing is kept or nothing was scored).
    densities: fraction of eligible entries trainable after each round.
    """

    masks: Tensors
    achieved_sparsity: float
    thresholds: list[float]
    densities: list[float]


def calibrate(
    model: nn.Module,
    score_fn: ScoreFn,
    rule: str,
    sparsity: float,
    *,
    rounds: int = 1,
    param_names: list[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Calibration:
    """Multi-round global mask calibration (TaLoS); masks True = trainable.

    score_fn(model) returns Fisher scores of the model as it is now; it is
    called once per round, only for the sensitivity rules (federated learning
    passes one that adds the clients' Fisher sums). Magnitude rules rank the
    original |theta|; random draws fresh uniforms per round from `seed`.
    param_names: eligible parameters (default: all but the head).
    sparsity in [0, 1): fraction of eligible entries frozen. With 0 nothing is
    scored and every mask is all True.
    """
    check_choice("rule", rule, RULES)
    sparsity = check_float("sparsity", sparsity, 0.0, 1.0, high_open=True)
    rounds = check_int("rounds", rounds, minimum=1)
    check_int("seed", seed, minimum=0)
    names = resolve_names(model, param_names, default=backbone_parameter_names(model))
    all_params = dict(model.named_parameters())
    params = {n: all_params[n] for n in names}
    if sparsity == 0.0:
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        return Calibration(masks, 0.0, [math.nan] * rounds, [1.0] * rounds)

    originals = {n: p.detach().clone() for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    kept = torch.ones(total, dtype=torch.bool, device=params[names[0]].device)  # flat, in `names` order
    thresholds, densities = [], []
    try:
        for round_index in tqdm(range(1, rounds + 1), desc="calibration rounds", disable=not progress):
            rank = _rank_scores(rule, model, score_fn, originals, seed, round_index, kept.device)
            rank[~kept] = math.inf  # after any negation: frozen entries can never come back
            keep_count = round((1.0 - sparsity) ** (round_index / rounds) * total)
            kept, boundary = _keep_lowest(rank, keep_count)
            thresholds.append(-boundary if rule in KEEP_HIGHEST_RULES else boundary)
            densities.append(keep_count / total)
            if round_index < rounds:
                _attenuate_frozen(params, originals, kept)
    finally:
        _load(params, originals)
    achieved = 1.0 - int(kept.sum()) / total
    return Calibration(_unflatten(kept, params), achieved, thresholds, densities)


def _keep_lowest(rank: torch.Tensor, keep_count: int) -> tuple[torch.Tensor, float]:
    """The flat mask of the keep_count lowest ranks, and the highest rank kept (nan if none)."""
    values, order = torch.sort(
        rank, stable=True
    )  # stable: ties keep the earlier entry, masks are deterministic
    kept = torch.zeros_like(rank, dtype=torch.bool)
    kept[order[:keep_count]] = True
    boundary = float(values[keep_count - 1]) if keep_count > 0 else math.nan
    return kept, boundary


def _attenuate_frozen(params: Tensors, originals: Tensors, kept: torch.Tensor) -> None:
    """Frozen entries at ATTENUATION x their original value, the others original, for the next scores.

    From the originals, not cumulative: an entry frozen in round 1 is 0.1 theta_0 in every later round.
    """
    attenuated = {
        name: torch.where(keep, originals[name], originals[name] * ATTENUATION)
        for name, keep in _unflatten(kept, params).items()
    }
    _load(params, attenuated)


def calibrate_masks(
    model: nn.Module,
    batches: Iterable,
    rule: str,
    sparsity: float,
    *,
    rounds: int = 1,
    param_names: list[str] | None = None,
    label_mode: str = "sampled",
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Tensors:
    """Masks (True = trainable) from Fisher scores on `batches`, calibrated in `rounds` rounds.

    `batches` must be re-iterable (a list): every round re-scores the same
    samples, now through the attenuated model. Round r draws its sampled
    labels from the stream (seed, 'fisher-labels', r). See `calibrate`.
    """
    check_choice("label_mode", label_mode, LABEL_MODES)
    check_int("chunk_size", chunk_size, minimum=1)
    if isinstance(batches, Iterator):
        raise ConfigError(
            "batches must be re-iterable (e.g. a list of (inputs, labels) pairs), "
            f"got a one-shot {type(batches).__name__}; every calibration round re-reads it"
        )
    names = resolve_names(model, param_names, default=backbone_parameter_names(model))
    round_numbers = count(1)

    def fisher_of_current_model(current: nn.Module) -> Tensors:
        generator = torch_generator(seed, "fisher-labels", next(round_numbers))
        return fisher_scores(
            current,
            batches,
            label_mode,
            names,
            generator=generator,
            chunk_size=chunk_size,
            autocast_dtype=autocast_dtype,
        )

    return calibrate(
        model,
        fisher_of_current_model,
        rule,
        sparsity,
        rounds=rounds,
        param_names=names,
        seed=seed,
        progress=progress,
    ).masks


def _rank_scores(rule, model, score_fn, originals, seed, round_index, device) -> torch.Tensor:
    """Flat rank scores over the eligible entries (in the order of `originals`), lower = keep trainable."""
    if rule in SENSITIVITY_RULES:
        scores = score_fn(model)
        if wrong := [n for n, w in originals.items() if n not in scores or scores[n].shape != w.shape]:
            raise ValueError(f"score_fn returned no scores or misshapen scores for {wrong}")
        if bad := [n for n in originals if not torch.isfinite(scores[n]).all()]:
            raise ValueError(f"score_fn returned non-finite Fisher scores for {bad}")
    elif rule == "random":  # one stream per round and parameter name, so dict order does not matter
        round_seed = derive_seed(seed, "calibration-round", round_index)
        scores = {
            n: torch.rand(w.shape, generator=torch_generator(round_seed, "random-scores", n))
            for n, w in originals.items()
        }
    else:
        scores = {n: weight.abs() for n, weight in originals.items()}  # the original weights, never Fisher
    dtype = reduce(torch.promote_types, [scores[n].dtype for n in originals], torch.float32)
    flat = torch.cat([scores[n].detach().reshape(-1).to(device, dtype) for n in originals])
    return flat.neg_() if rule in KEEP_HIGHEST_RULES else flat


def _unflatten(flat: torch.Tensor, params: Tensors) -> Tensors:
    pieces = flat.split([p.numel() for p in params.values()])
    return {n: piece.reshape(p.shape).to(p.device).clone() for (n, p), piece in zip(params.items(), pieces)}


@torch.no_grad()
def _load(params: Tensors, values: Tensors) -> None:
    for name, param in params.items():
        param.copy_(values[name])


# ---------------------------------------------------------------- mask storage
def count_trainable(masks: Tensors) -> int:
    """Number of trainable (True) entries over all masks."""
    return sum(int(mask.sum()) for mask in masks.values())


def mask_sparsity(masks: Tensors) -> float:
    """Fraction of entries frozen (False) over all masks."""
    total = sum(mask.numel() for mask in masks.values())
    if total == 0:
        raise ValueError("masks hold no entries; sparsity is undefined")
    return 1.0 - count_trainable(masks) / total


def mask_density_by_parameter(masks: Tensors) -> pd.DataFrame:
    """One row per mask: parameter, entries, trainable, density, block, kind.

    block is the transformer block index parsed from 'blocks.N.' (-1 outside
    the blocks); kind is the name without that prefix (e.g. 'attn.qkv.weight'),
    so rows group by layer type across blocks.
    """
    rows = []
    for name, mask in masks.items():
        match = BLOCK_NAME.match(name)
        block, kind = (int(match.group(1)), match.group(2)) if match else (-1, name)
        entries, trainable = mask.numel(), int(mask.sum())
        density = trainable / entries if entries else math.nan
        rows.append((name, entries, trainable, density, block, kind))
    return pd.DataFrame(rows, columns=["parameter", "entries", "trainable", "density", "block", "kind"])


def jaccard(masks_a: Tensors, masks_b: Tensors) -> float:
    """|A ∩ B| / |A ∪ B| of the trainable entries; 1.0 when both have none."""
    wrong = sorted(set(masks_a) ^ set(masks_b))  # parameters in only one of them, else misshapen ones
    if wrong := wrong or [n for n, mask in masks_a.items() if mask.shape != masks_b[n].shape]:
        raise ValueError(f"the masks differ in which parameters they cover or in shape: {wrong}")
    intersection = sum(int((a & masks_b[n].to(a.device)).sum()) for n, a in masks_a.items())
    union = count_trainable(masks_a) + count_trainable(masks_b) - intersection
    return 1.0 if union == 0 else intersection / union


def pack_masks(masks: Tensors) -> dict[str, dict]:
    """Bit-packed masks: {name: {'shape': [ints], 'bits': uint8 tensor}}, 8x smaller than bool.

    Only tensors, lists, ints and strings, so torch.load(weights_only=True) reads it back.
    """
    if wrong := [name for name, mask in masks.items() if mask.dtype != torch.bool]:
        raise ValueError(f"mask {wrong[0]!r} has dtype {masks[wrong[0]].dtype}; masks are bool tensors")
    return {
        name: {"shape": list(mask.shape), "bits": torch.from_numpy(np.packbits(mask.cpu().numpy()))}
        for name, mask in masks.items()
    }


def unpack_masks(packed: dict[str, dict], device: torch.device | str = "cpu") -> Tensors:
    """The bool masks stored by `pack_masks`, on `device`."""
    masks = {}
    for name, entry in packed.items():
        shape = [int(size) for size in entry["shape"]]
        numel, bits = math.prod(shape), entry["bits"]
        if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
            raise ValueError(
                f"packed mask {name!r} has {bits.numel()} {bits.dtype} bytes; "
                f"shape {shape} needs {(numel + 7) // 8} uint8 bytes"
            )
        flat = np.unpackbits(bits.cpu().numpy(), count=numel).astype(bool)
        masks[name] = torch.from_numpy(flat).reshape(shape).to(device)
    return masks
