"""Diagonal Fisher information of a model's parameters, from per-sample gradients.

The scores that the sensitivity rules of `masks` calibrate masks with.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .checks import ConfigError, check_choice, check_int
from .data import torch_generator

LABEL_MODES = ("sampled", "true")
DEFAULT_CHUNK = 32  # samples per vmap call; memory arithmetic in the module docstring
DEFAULT_LABEL_SEED = 0  # label sampling is deterministic even without a generator

Tensors = dict[str, torch.Tensor]  # parameter name -> scores, sums or masks
Sums = tuple[Tensors, int]  # Fisher sums per parameter, and the number of samples summed


def fisher_sums(
    model: nn.Module,
    batches: Iterable,
    label_mode: str = "sampled",
    param_names: list[str] | None = None,
    *,
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
        model,
        batches,
        label_mode,
        param_names,
        add_squares=_add_squares_vmap,
        generator=generator,
        chunk_size=chunk_size,
        autocast_dtype=autocast_dtype,
    )


def fisher_sums_loop(model, batches, label_mode="sampled", param_names=None, **options) -> Sums:
    """`fisher_sums` by one forward and backward per sample: the slow, plain reference (same options)."""
    return _fisher_sums(model, batches, label_mode, param_names, add_squares=_add_squares_loop, **options)


def fisher_scores(model, batches, label_mode="sampled", param_names=None, **options) -> Tensors:
    """Diagonal Fisher: `fisher_sums` (same options) divided by the sample count."""
    sums, n = fisher_sums(model, batches, label_mode, param_names, **options)
    if n == 0:
        raise ConfigError("batches holds no samples; the Fisher needs at least one")
    return {name: total / n for name, total in sums.items()}


def _fisher_sums(
    model,
    batches,
    label_mode="sampled",
    param_names=None,
    *,
    add_squares,
    generator=None,
    chunk_size=DEFAULT_CHUNK,
    autocast_dtype=None,
):
    check_choice("label_mode", label_mode, LABEL_MODES)
    check_int("chunk_size", chunk_size, minimum=1)
    params = dict(model.named_parameters())
    names = resolve_names(model, param_names, default=list(params))
    if generator is None:
        generator = torch_generator(DEFAULT_LABEL_SEED, "fisher-labels")
    # float32 at least (bf16/fp16 models), float64 for float64 models
    sums = {}
    for name in names:
        dtype = torch.promote_types(params[name].dtype, torch.float32)
        sums[name] = torch.zeros_like(params[name], dtype=dtype)
    num_samples = 0
    with _scoring_state(model, names):
        for inputs, labels in _chunks(batches, chunk_size, params[names[0]].device):
            targets = _targets(model, inputs, labels, label_mode, generator, autocast_dtype)
            add_squares(model, inputs, targets, sums, autocast_dtype)
            num_samples += len(inputs)
    return sums, num_samples


def resolve_names(
    model: nn.Module,
    param_names: list[str] | None,
    default: list[str],
) -> list[str]:
    """The named parameters to score, checked against the model; `default` when param_names is None."""
    if param_names is None:
        return list(default)
    if isinstance(param_names, str):
        raise ConfigError(f"param_names must be a list of parameter names, got the string {param_names!r}")
    names = list(dict.fromkeys(param_names))  # drop duplicates, keep order
    known = dict(model.named_parameters())
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
    drawn = torch.multinomial(probs, 1, generator=generator)
    return drawn.squeeze(1).to(inputs.device)


def _log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target|x) per row; gather (not indexing) so that it works under vmap."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)


def _add_squares_vmap(model, inputs, targets, sums, autocast_dtype) -> None:
    """Adds each scored parameter's squared per-sample gradients to its entry of `sums`."""
    scored = {n: p.detach() for n, p in model.named_parameters() if n in sums}

    def log_prob(params, sample, target):
        with _autocast(sample.device, autocast_dtype):
            logits = functional_call(model, params, (sample.unsqueeze(0),))
        return _log_probs(logits, target.view(1)).sum()

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))(scored, inputs, targets)
    for name in sums:  # pop: each [chunk, *shape] block is freed once squared
        squares = per_sample.pop(name).to(sums[name].dtype).square()
        sums[name] += squares.sum(0)


def _add_squares_loop(model, inputs, targets, sums, autocast_dtype) -> None:
    params = dict(model.named_parameters())
    for sample, target in zip(inputs, targets):
        with _autocast(inputs.device, autocast_dtype):
            log_prob = _log_probs(model(sample.unsqueeze(0)), target.view(1)).sum()
        grads = torch.autograd.grad(log_prob, [params[n] for n in sums], allow_unused=True)
        for name, gradient in zip(sums, grads):
            if gradient is not None:  # None: the parameter does not affect the output
                sums[name] += gradient.to(sums[name].dtype).square()
