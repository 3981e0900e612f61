"""Diagonal Fisher scores, multi-round mask calibration (TaLoS) and mask utilities.

Why: sparse fine-tuning for task arithmetic updates only the parameters the
pre-trained model is least sensitive to, so that the fine-tuned weights move
in directions that barely change the model's outputs on other tasks (TaLoS,
Iurada et al., ICLR 2025). Sensitivity is measured by the diagonal of the
Fisher information matrix,

    F_j = E_x E_{y ~ p(y|x)} [ (d log p(y|x) / d theta_j)^2 ],

a mean of squared *per-sample* gradients (the square of a mini-batch's mean
gradient is a different, much smaller quantity). `label_mode="sampled"` draws
y from the model's own predictive distribution (the true Fisher);
`label_mode="true"` uses the dataset labels (the empirical Fisher). Unlike the
TaLoS code, which squares the gradient of the sampled class's raw logit, we
differentiate log p(y|x) (log-softmax), as the definition above says.

Per-sample gradients come from torch.func: vmap(grad(log p)) over a
functional_call of the model, one chunk of samples at a time; any model works.
`fisher_sums_loop` (one backward per sample) is the reference the tests and
the GPU check compare against. Samples/s with torch.set_num_threads(2) on a
shared 2-core CPU, random weights, methods interleaved in one process, best of
10 (tiny_vit, 32 px, 64 samples, chunk 32) or 3 (ViT-S/16, 224 px, 8 samples,
chunk 8); peak RSS growth at chunk 8 from one fresh process per method:
    tiny_vit:  per-layer hooks 290, vmap 310-330, loop 85
    ViT-S/16:  hooks 1.22 (+0.7 GB), vmap 1.11-1.22 (+2.4 GB), loop 0.86 (+0.4 GB)
Per-layer hooks (each layer's per-sample gradient rebuilt from its input and
output gradient) were ~1.1x faster on ViT-S/16 (1.2-1.5x in noisier runs) and
used less memory, but took ~150 lines of layer formulas and refused every other
layer type; the Fisher is computed only while calibrating (a few rounds over a
few thousand samples), so vmap's brevity and generality won.

Memory of one chunk on ViT-S/16 at 224 px in fp32: the per-sample gradients
are chunk x 21.7 M parameters x 4 B = 87 MB per sample; with the activations
of the chunk's forward/backward under vmap (unfused attention) the peak CPU RSS
grows by ~280 MB per sample (measured: +2.4 GB at chunk 8, +4.6 GB at chunk 16).
DEFAULT_CHUNK = 32 thus needs ~32 x 280 MB = 9 GB, within the ~15 GB a 16 GB T4
offers, and fp16 autocast halves the activations' share.

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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import reduce
from itertools import count

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .checks import ConfigError, check_choice, check_float, check_int
from .data import derive_seed, torch_generator
from .models import backbone_parameter_names

LABEL_MODES = ("sampled", "true")
RULES = ("least_sensitive", "most_sensitive", "lowest_magnitude", "highest_magnitude", "random")
SENSITIVITY_RULES = ("least_sensitive", "most_sensitive")
KEEP_HIGHEST_RULES = ("most_sensitive", "highest_magnitude")  # ranked by the negated score
ATTENUATION = 0.1  # TaLoS: frozen entries are scaled by 0.1 in the forward of later rounds
DEFAULT_CHUNK = 32  # samples per vmap call; memory arithmetic in the module docstring
DEFAULT_LABEL_SEED = 0  # label sampling is deterministic even without a generator
BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")  # timm ViT: 'blocks.3.attn.qkv.weight'

Tensors = dict[str, torch.Tensor]  # parameter name -> scores, sums or masks
Sums = tuple[Tensors, int]  # Fisher sums per parameter, and the number of samples summed
ScoreFn = Callable[[nn.Module], Tensors]


# ============================================================== Fisher scores
def fisher_sums(
    model: nn.Module,
    batches: Iterable,
    label_mode: str = "sampled",
    param_names: list[str] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    autocast_dtype: torch.dtype | None = None,
) -> Sums:
    """Per-parameter sums over samples of squared per-sample gradients of log p(y|x), and the count.

    Sums (not means) so that federated clients can send theirs and the server
    adds them: the result equals the Fisher sums of the union of their data.

    batches: iterable of (inputs, labels) pairs, inputs model-ready [B, 3, H, W].
    label_mode: 'sampled' (y ~ softmax(logits), the true Fisher) or 'true'.
    param_names: parameters to score (default: every named parameter).
    generator: draws the sampled labels; default a fixed-seed generator.
    chunk_size: samples per vmap call (bounds memory; also the unit of label
        sampling, so that this and `fisher_sums_loop` agree given the same generator).
    autocast_dtype: e.g. torch.bfloat16 for the forward/backward on a GPU;
        squares are accumulated in at least float32 regardless.

    The model is scored in eval mode; its weights, .grad, requires_grad flags
    and train/eval modes are left exactly as they were.
    """
    return _fisher_sums(
        model, batches, label_mode, param_names, generator, chunk_size, autocast_dtype, _add_squares_vmap
    )


def fisher_sums_loop(
    model: nn.Module,
    batches: Iterable,
    label_mode: str = "sampled",
    param_names: list[str] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    autocast_dtype: torch.dtype | None = None,
) -> Sums:
    """`fisher_sums` by one forward and backward per sample: the slow, plain reference."""
    return _fisher_sums(
        model, batches, label_mode, param_names, generator, chunk_size, autocast_dtype, _add_squares_loop
    )


def fisher_scores(
    model: nn.Module,
    batches: Iterable,
    label_mode: str = "sampled",
    param_names: list[str] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    autocast_dtype: torch.dtype | None = None,
) -> Tensors:
    """Diagonal Fisher: `fisher_sums` divided by the sample count."""
    sums, n = fisher_sums(model, batches, label_mode, param_names, generator, chunk_size, autocast_dtype)
    if n == 0:
        raise ConfigError("batches holds no samples; the Fisher needs at least one")
    return {name: total / n for name, total in sums.items()}


def _fisher_sums(model, batches, label_mode, param_names, generator, chunk_size, autocast_dtype, add_squares):
    check_choice("label_mode", label_mode, LABEL_MODES)
    check_int("chunk_size", chunk_size, minimum=1)
    names = _resolve_names(model, param_names, default=[n for n, _ in model.named_parameters()])
    generator = torch_generator(DEFAULT_LABEL_SEED, "fisher-labels") if generator is None else generator
    params = dict(model.named_parameters())
    # float32 at least (bf16/fp16 models), float64 for float64 models
    sums = {
        n: torch.zeros_like(params[n], dtype=torch.promote_types(params[n].dtype, torch.float32))
        for n in names
    }
    num_samples = 0
    with _scoring_state(model, names):
        for inputs, labels in _chunks(batches, chunk_size, params[names[0]].device):
            targets = _targets(model, inputs, labels, label_mode, generator, autocast_dtype)
            add_squares(model, names, inputs, targets, sums, autocast_dtype)
            num_samples += len(inputs)
    return sums, num_samples


def _resolve_names(model: nn.Module, param_names: list[str] | None, default: list[str]) -> list[str]:
    if param_names is None:
        return list(default)
    if isinstance(param_names, str):
        raise ConfigError(f"param_names must be a list of parameter names, got the string {param_names!r}")
    names = list(dict.fromkeys(param_names))  # drop duplicates, keep order
    known = {n for n, _ in model.named_parameters()}
    if unknown := [n for n in names if n not in known]:
        raise ConfigError(f"param_names has names that are not parameters of the model: {unknown}")
    if not names:
        raise ConfigError("param_names is empty; give at least one parameter name")
    return names


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def _scoring_state(model: nn.Module, names: list[str]):
    """Eval mode, grad only for the scored parameters, unfused attention; then all restored."""
    modes = {module: module.training for module in model.modules()}
    # timm's fused attention kernel has no vmap batching rule; the loop uses the same math.
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    # torch.func.functional_call can leave plain tensors in place of the
    # Parameters of a module that is called at two paths; put the originals back, with their flags.
    registered = [
        (m, key, p, p.requires_grad) for m in model.modules() for key, p in m.named_parameters(recurse=False)
    ]
    try:
        model.eval()
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)  # the loop differentiates these; vmap uses detached copies
        for module in fused:
            module.fused_attn = False
        yield
    finally:
        for module, key, param, requires_grad in registered:
            if getattr(module, key) is not param:
                module.register_parameter(key, param)
            param.requires_grad_(requires_grad)
        for module, training in modes.items():
            module.training = training
        for module, was_fused in fused.items():
            module.fused_attn = was_fused


def _chunks(batches: Iterable, chunk_size: int, device: torch.device) -> Iterator:
    for inputs, labels in batches:
        for start in range(0, len(inputs), chunk_size):
            chunk_labels = None if labels is None else labels[start : start + chunk_size].to(device)
            yield inputs[start : start + chunk_size].to(device), chunk_labels


def _targets(model, inputs, labels, label_mode, generator, autocast_dtype) -> torch.Tensor:
    """The class whose log-probability is differentiated, per sample.

    Sampled labels come from a no-grad forward of the whole chunk, drawn before
    any gradient and identically for vmap and the loop, so both see the same
    labels for the same generator.
    """
    if label_mode == "true":
        if labels is None:
            raise ConfigError("label_mode='true' needs labels in every (inputs, labels) batch")
        return labels.long()
    with torch.no_grad(), _autocast(inputs.device, autocast_dtype):
        logits = model(inputs)
    probs = torch.softmax(logits.float(), dim=-1).to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(inputs.device)


def _log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target|x) per row; gather (not indexing) so that it works under vmap."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def _add_squares_vmap(model, names, inputs, targets, sums, autocast_dtype) -> None:
    scored = {n: p.detach() for n, p in model.named_parameters() if n in sums}

    def log_prob(params, sample, target):
        with _autocast(sample.device, autocast_dtype):
            logits = functional_call(model, params, (sample.unsqueeze(0),))
        return _log_probs(logits, target.view(1)).sum()

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))(scored, inputs, targets)
    for name in names:  # pop: each [chunk, *shape] block is freed once squared
        sums[name] += per_sample.pop(name).to(sums[name].dtype).square().sum(0)


def _add_squares_loop(model, names, inputs, targets, sums, autocast_dtype) -> None:
    params = dict(model.named_parameters())
    for sample, target in zip(inputs, targets):
        with _autocast(inputs.device, autocast_dtype):
            log_prob = _log_probs(model(sample.unsqueeze(0)), target.view(1)).sum()
        grads = torch.autograd.grad(log_prob, [params[n] for n in names], allow_unused=True)
        for name, gradient in zip(names, grads):
            if gradient is not None:  # None: the parameter does not affect the output
                sums[name] += gradient.to(sums[name].dtype).square()


# ================================================================ calibration
@dataclass
class Calibration:
    """The outcome of `calibrate`.

    thresholds: per round, the boundary score in the rule's own units (e.g.
        least_sensitive: the largest Fisher score still trainable; nan when
        nothing is kept or nothing was scored).
    densities: fraction of eligible entries trainable after each round.
    """

    masks: Tensors
    rule: str
    target_sparsity: float
    achieved_sparsity: float
    rounds: int
    thresholds: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)


def calibrate(
    model: nn.Module,
    score_fn: ScoreFn,
    rule: str,
    sparsity: float,
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
    names = _resolve_names(model, param_names, default=backbone_parameter_names(model))
    all_params = dict(model.named_parameters())
    params = {n: all_params[n] for n in names}
    if sparsity == 0.0:
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        return Calibration(masks, rule, 0.0, 0.0, rounds, [math.nan] * rounds, [1.0] * rounds)

    originals = {n: p.detach().clone() for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    device = params[names[0]].device
    kept = torch.ones(total, dtype=torch.bool, device=device)  # flat over eligible entries, `names` order
    thresholds, densities = [], []
    try:
        for round_index in tqdm(range(1, rounds + 1), desc="calibration rounds", disable=not progress):
            rank = _rank_scores(rule, model, score_fn, originals, seed, round_index, device)
            rank[~kept] = math.inf  # after any negation: frozen entries can never come back
            keep_count = round((1.0 - sparsity) ** (round_index / rounds) * total)
            # stable sort: ties keep the earlier position, so masks are deterministic
            values, order = torch.sort(rank, stable=True)
            kept = torch.zeros_like(rank, dtype=torch.bool)
            kept[order[:keep_count]] = True
            boundary = float(values[keep_count - 1]) if keep_count > 0 else math.nan
            thresholds.append(-boundary if rule in KEEP_HIGHEST_RULES else boundary)
            densities.append(keep_count / total)
            if round_index < rounds:  # from the originals, not cumulative: frozen = 0.1 * theta_0
                _load(
                    params,
                    {
                        n: torch.where(k, originals[n], originals[n] * ATTENUATION)
                        for n, k in _unflatten(kept, params).items()
                    },
                )
    finally:
        _load(params, originals)
    achieved = 1.0 - int(kept.sum()) / total
    return Calibration(_unflatten(kept, params), rule, sparsity, achieved, rounds, thresholds, densities)


def calibrate_masks(
    model: nn.Module,
    batches: Iterable,
    rule: str,
    sparsity: float,
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
    names = _resolve_names(model, param_names, default=backbone_parameter_names(model))
    round_numbers = count(1)

    def fisher_of_current_model(current: nn.Module) -> Tensors:
        generator = torch_generator(seed, "fisher-labels", next(round_numbers))
        return fisher_scores(current, batches, label_mode, names, generator, chunk_size, autocast_dtype)

    return calibrate(model, fisher_of_current_model, rule, sparsity, rounds, names, seed, progress).masks


def _rank_scores(rule, model, score_fn, originals, seed, round_index, device) -> torch.Tensor:
    """Flat rank scores over the eligible entries (in the order of `originals`), lower = keep trainable."""
    if rule in SENSITIVITY_RULES:
        scores = score_fn(model)
        if wrong := [n for n, w in originals.items() if n not in scores or scores[n].shape != w.shape]:
            raise ValueError(f"score_fn returned no scores or misshapen scores for {wrong}")
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
    if rule in SENSITIVITY_RULES and not torch.isfinite(flat).all():
        bad = [n for n in originals if not torch.isfinite(scores[n]).all()]
        raise ValueError(f"score_fn returned non-finite Fisher scores for {bad}")
    return flat.neg_() if rule in KEEP_HIGHEST_RULES else flat


def _unflatten(flat: torch.Tensor, params: Tensors) -> Tensors:
    pieces = flat.split([p.numel() for p in params.values()])
    return {n: piece.reshape(p.shape).to(p.device).clone() for (n, p), piece in zip(params.items(), pieces)}


@torch.no_grad()
def _load(params: Tensors, values: Tensors) -> None:
    for name, param in params.items():
        param.copy_(values[name])


# ============================================================== mask utilities
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
        rows.append(
            dict(
                parameter=name,
                entries=entries,
                trainable=trainable,
                density=trainable / entries if entries else math.nan,
                block=block,
                kind=kind,
            )
        )
    return pd.DataFrame(rows, columns=["parameter", "entries", "trainable", "density", "block", "kind"])


def jaccard(masks_a: Tensors, masks_b: Tensors) -> float:
    """|A ∩ B| / |A ∪ B| of the trainable entries; 1.0 when both have none."""
    wrong = sorted(set(masks_a) ^ set(masks_b))  # parameters in only one of them, else misshapen ones
    if wrong := wrong or [n for n, mask in masks_a.items() if mask.shape != masks_b[n].shape]:
        raise ValueError(f"the masks differ in which parameters they cover or in shape: {wrong}")
    intersection = sum(int((a & masks_b[n].to(a.device)).sum()) for n, a in masks_a.items())
    union = sum(int((a | masks_b[n].to(a.device)).sum()) for n, a in masks_a.items())
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
