"""Diagonal Fisher scores and multi-round mask calibration (TaLoS).

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

Per-sample gradients, three ways (identical results, see the tests):
  - "hooks": one forward + backward per chunk; each supported layer's
    per-sample gradient is rebuilt from its saved input and its output
    gradient (as Opacus and BackPACK do), squared and summed over the chunk.
    No weight gradient is ever formed. Fastest; covers ViTs.
  - "vmap": torch.func.vmap(grad(...)) over the samples of a chunk; any model,
    memory grows as chunk_size x parameter count.
  - "loop": one forward + backward per sample; the plain ground truth.

Calibration (TaLoS Sec. 4.2, vision/prune_finetune.py of the reference code)
runs R rounds towards the final density d: round r keeps the round(d^(r/R) N)
lowest-ranked eligible entries globally (one threshold across all tensors);
entries frozen earlier rank +inf so they never come back; while later rounds
are scored, frozen entries are attenuated to 0.1x in the forward pass, so
the next scores are those of the partially masked network. Afterwards the
model's weights are exactly the original ones again.

Mask convention (DESIGN.md): bool tensor shaped like its parameter, True =
trainable, False = frozen; sparsity = fraction of eligible entries frozen, with
the same meaning for every rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import count

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .checks import ConfigError, check_choice, check_float, check_int
from .models import backbone_parameter_names
from .seeding import derive_seed, torch_generator

LABEL_MODES = ("sampled", "true")
METHODS = ("hooks", "vmap", "loop")
RULES = ("least_sensitive", "most_sensitive", "lowest_magnitude", "highest_magnitude", "random")
SENSITIVITY_RULES = ("least_sensitive", "most_sensitive")
KEEP_HIGHEST_RULES = ("most_sensitive", "highest_magnitude")  # ranked by the negated score
ATTENUATION = 0.1  # TaLoS: frozen entries are scaled by 0.1 in the forward of later rounds
DEFAULT_LABEL_SEED = 0  # label sampling is deterministic even without a generator

ScoreFn = Callable[[nn.Module], dict[str, torch.Tensor]]


# ============================================================== Fisher scores
def fisher_scores(
    model: nn.Module,
    batches: Iterable,
    label_mode: str = "sampled",
    param_names: list[str] | None = None,
    generator: torch.Generator | None = None,
    method: str = "hooks",
    chunk_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: the mean over samples of squared per-sample gradients of log p(y|x).

    See `fisher_sums` for the arguments; this divides its sums by the sample count.
    """
    sums, num_samples = fisher_sums(model, batches, label_mode, param_names, generator,
                                    method, chunk_size, autocast_dtype)
    if num_samples == 0:
        raise ConfigError("batches holds no samples; the Fisher needs at least one")
    return {name: total / num_samples for name, total in sums.items()}


def fisher_sums(
    model: nn.Module,
    batches: Iterable,
    label_mode: str = "sampled",
    param_names: list[str] | None = None,
    generator: torch.Generator | None = None,
    method: str = "hooks",
    chunk_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-parameter sums over samples of squared per-sample gradients, and the sample count.

    Sums (not means) so that federated clients can send theirs and the server
    adds them: the result equals the Fisher sums of the union of their data.

    batches: iterable of (inputs, labels) pairs, inputs model-ready [B, 3, H, W].
    label_mode: 'sampled' (y ~ softmax(logits), the true Fisher) or 'true'.
    param_names: parameters to score (default: every named parameter).
    generator: draws the sampled labels; default a fixed-seed generator.
    method: 'hooks' (fast, ViT layers), 'vmap' (any model) or 'loop' (reference).
    chunk_size: samples per forward/backward (bounds memory; also the unit of
        label sampling, so methods agree exactly given the same generator).
    autocast_dtype: e.g. torch.bfloat16 for the forward/backward on a GPU;
        squares are accumulated in at least float32 regardless.

    The model is scored in eval mode; its weights, .grad, requires_grad flags
    and train/eval modes are left exactly as they were.
    """
    check_fisher_options(label_mode, method, chunk_size)
    names = _resolve_names(model, param_names, default=[n for n, _ in model.named_parameters()])
    if generator is None:
        generator = torch_generator(DEFAULT_LABEL_SEED, "fisher-labels")
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if method == "hooks":
        _check_hooks_support(model, names)

    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n], dtype=_accumulator_dtype(params[n])) for n in names}
    add_squares = {"hooks": _add_squares_hooks, "vmap": _add_squares_vmap, "loop": _add_squares_loop}[method]
    device = params[names[0]].device
    num_samples = 0
    with _scoring_state(model, names, method):
        for inputs, labels in _chunks(batches, chunk_size, device):
            targets = _targets(model, inputs, labels, label_mode, generator, autocast_dtype)
            add_squares(model, names, inputs, targets, sums, autocast_dtype)
            num_samples += len(inputs)
    return sums, num_samples


def check_fisher_options(label_mode: str, method: str, chunk_size: int) -> None:
    """Raise ConfigError for a bad label_mode, method or chunk_size (before any compute)."""
    check_choice("label_mode", label_mode, LABEL_MODES)
    check_choice("method", method, METHODS)
    check_int("chunk_size", chunk_size, minimum=1)


def _resolve_names(model: nn.Module, param_names: list[str] | None, default: list[str]) -> list[str]:
    if param_names is None:
        return list(default)
    if isinstance(param_names, str):
        raise ConfigError(f"param_names must be a list of parameter names, got the string {param_names!r}")
    names = list(dict.fromkeys(param_names))  # drop duplicates, keep order
    known = {n for n, _ in model.named_parameters()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"param_names has names that are not parameters of the model: {unknown}")
    if not names:
        raise ConfigError("param_names is empty; give at least one parameter name")
    return names


def _accumulator_dtype(param: torch.Tensor) -> torch.dtype:
    # float32 at least (bf16/fp16 models), float64 for float64 models.
    return torch.promote_types(param.dtype, torch.float32)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def _scoring_state(model: nn.Module, names: list[str], method: str):
    """Eval mode, the requires_grad flags the method needs, unfused attention under vmap; then restore."""
    modes = {module: module.training for module in model.modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # hooks differentiate w.r.t. the inputs and vmap w.r.t. functional copies,
    # so only the loop needs the scored parameters to require grad.
    needs_grad = set(names) if method == "loop" else set()
    # The fused attention kernel has no vmap batching rule (slow fallback).
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")} if method == "vmap" else {}
    # torch.func.functional_call can leave plain tensors in place of the
    # Parameters of a module that is called at two paths; put the originals back.
    registered = [(m, key, p) for m in model.modules() for key, p in m.named_parameters(recurse=False)]
    try:
        model.eval()
        for name, param in model.named_parameters():
            param.requires_grad_(name in needs_grad)
        for module in fused:
            module.fused_attn = False
        yield
    finally:
        for module, key, param in registered:
            if getattr(module, key) is not param:
                module.register_parameter(key, param)
        for module, training in modes.items():
            module.training = training
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
        for module, was_fused in fused.items():
            module.fused_attn = was_fused


def _chunks(batches: Iterable, chunk_size: int, device: torch.device) -> Iterator:
    for batch in batches:
        inputs, labels = batch
        for start in range(0, len(inputs), chunk_size):
            chunk_labels = None if labels is None else labels[start:start + chunk_size].to(device)
            yield inputs[start:start + chunk_size].to(device), chunk_labels


def _targets(model, inputs, labels, label_mode, generator, autocast_dtype) -> torch.Tensor:
    """The class whose log-probability is differentiated, per sample.

    Sampled labels come from a separate no-grad forward of the whole chunk,
    drawn before any gradient, identically in every method, so that the
    methods see the same labels for the same generator.
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


# -------------------------------------------------------------- method: loop
def _add_squares_loop(model, names, inputs, targets, sums, autocast_dtype) -> None:
    params = dict(model.named_parameters())
    scored = [params[n] for n in names]
    for sample, target in zip(inputs, targets):
        with _autocast(inputs.device, autocast_dtype):
            log_prob = _log_probs(model(sample.unsqueeze(0)), target.view(1)).sum()
        grads = torch.autograd.grad(log_prob, scored, allow_unused=True)
        for name, gradient in zip(names, grads):
            if gradient is not None:  # None: the parameter does not affect the output
                sums[name] += gradient.to(sums[name].dtype).square()


# -------------------------------------------------------------- method: vmap
def _add_squares_vmap(model, names, inputs, targets, sums, autocast_dtype) -> None:
    scored = {n: p.detach() for n, p in model.named_parameters() if n in sums}

    def log_prob(params, sample, target):
        with _autocast(sample.device, autocast_dtype):
            logits = functional_call(model, params, (sample.unsqueeze(0),))
        return _log_probs(logits, target.view(1)).sum()

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))(scored, inputs, targets)
    for name, grads in per_sample.items():
        sums[name] += grads.to(sums[name].dtype).square().sum(0)


# ------------------------------------------------------------- method: hooks
# Per-sample gradients from a layer's input x_b and output gradient g_b:
#   Linear  W: sum_t g_bt x_bt^T,  b: sum_t g_bt
#   LayerNorm  gamma: sum_t g_bt * xhat_bt,  beta: sum_t g_bt
#   Conv2d  W: g_b (out x L) @ unfold(x_b)^T (L x in*kh*kw),  b: sum_L g_b
#   ViT tokens: pos_embed gets the gradient of (tokens + pos_embed) itself and
#   cls_token its row 0 (timm's _pos_embed with no_embed_class=False).
HOOKABLE = "nn.Linear, nn.LayerNorm, nn.Conv2d (groups=1, zero padding) and timm ViT's cls_token/pos_embed"


def _hooked_modules(model: nn.Module, names: list[str]) -> dict[nn.Module, dict[str, str]]:
    """module -> {local parameter name: full name} for every scored parameter."""
    wanted = set(names)
    owners: dict[nn.Module, dict[str, str]] = {}
    for prefix, module in model.named_modules():
        for local, _ in module.named_parameters(recurse=False):
            full = f"{prefix}.{local}" if prefix else local
            if full in wanted:
                owners.setdefault(module, {})[local] = full
    return owners


def _check_hooks_support(model: nn.Module, names: list[str]) -> None:
    unsupported = []
    for module, params in _hooked_modules(model, names).items():
        if not _hookable(module, params):
            unsupported += list(params.values())
    if unsupported:
        raise ConfigError(
            f"method='hooks' cannot form per-sample gradients of {unsupported} (supported: {HOOKABLE}); "
            "use method='vmap' for these parameters")


def _hookable(module: nn.Module, params: dict[str, str]) -> bool:
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return True
    if isinstance(module, nn.Conv2d):
        return (module.groups == 1 and module.padding_mode == "zeros"
                and (not isinstance(module.padding, str) or module.padding == "valid"))
    if isinstance(module, VisionTransformer):
        return (set(params) <= {"cls_token", "pos_embed"} and not module.no_embed_class
                and module.reg_token is None and not module.dynamic_img_size and module.pos_embed is not None)
    return False


def _add_squares_hooks(model, names, inputs, targets, sums, autocast_dtype) -> None:
    handles = []
    called: set[nn.Module] = set()
    try:
        for module, params in _hooked_modules(model, names).items():
            forward_hook = _make_forward_hook(module, params, sums, handles, called)
            # tokens + pos_embed leave timm's _pos_embed through pos_drop
            hooked = module.pos_drop if isinstance(module, VisionTransformer) else module
            handles.append(hooked.register_forward_hook(forward_hook))
        # Differentiate w.r.t. the inputs, not the weights: the backward then
        # reaches every hooked output without forming any weight gradient.
        inputs = inputs.detach().requires_grad_(True)
        with _autocast(inputs.device, autocast_dtype):
            log_prob = _log_probs(model(inputs), targets).sum()
        torch.autograd.grad(log_prob, inputs)
    finally:
        for handle in handles:
            handle.remove()


def _make_forward_hook(module, params, sums, handles, called):
    square_sums = _square_sums_function(module)

    def forward_hook(hooked, args, output):
        if module in called:  # a reused module's per-sample gradient is a sum over its calls
            raise ConfigError(f"method='hooks' needs each module called once per forward; "
                              f"{list(params.values())} belong to a module called twice; use method='vmap'")
        called.add(module)
        if not output.requires_grad:  # e.g. a layer applied to a constant: its gradient is not tracked here
            raise ConfigError(f"method='hooks' needs layer outputs that depend on the inputs; "
                              f"{list(params.values())} do not; use method='vmap'")
        saved_input = [args[0].detach()]  # popped in the tensor hook to free memory early

        def tensor_hook(output_grad):
            for local, squares in square_sums(module, saved_input.pop(), output_grad, params).items():
                sums[params[local]] += squares
        handles.append(output.register_hook(tensor_hook))
    return forward_hook


def _square_sums_function(module):
    if isinstance(module, nn.Linear):
        return _linear_square_sums
    if isinstance(module, nn.LayerNorm):
        return _layer_norm_square_sums
    if isinstance(module, nn.Conv2d):
        return _conv2d_square_sums
    return _token_square_sums


def _dtype_of(module: nn.Module) -> torch.dtype:
    return _accumulator_dtype(next(module.parameters()))


def _linear_square_sums(module: nn.Linear, x, output_grad, params) -> dict[str, torch.Tensor]:
    dtype = _dtype_of(module)
    x = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)  # [B, T, in]
    g = output_grad.reshape(output_grad.shape[0], -1, output_grad.shape[-1]).to(dtype)  # [B, T, out]
    squares = {}
    if "weight" in params:
        squares["weight"] = torch.einsum("bto,bti->boi", g, x).square().sum(0)
    if "bias" in params:
        squares["bias"] = g.sum(1).square().sum(0)
    return squares


def _layer_norm_square_sums(module: nn.LayerNorm, x, output_grad, params) -> dict[str, torch.Tensor]:
    dtype = _dtype_of(module)
    shape = tuple(module.normalized_shape)
    x_hat = F.layer_norm(x.to(dtype), shape, eps=module.eps)  # the module's own normalisation, no affine
    g = output_grad.to(dtype)

    def per_sample(t):  # sum over tokens: [B, ..., *shape] -> [B, *shape]
        return t.reshape(t.shape[0], -1, *shape).sum(1)

    squares = {}
    if "weight" in params:
        squares["weight"] = per_sample(g * x_hat).square().sum(0)
    if "bias" in params:
        squares["bias"] = per_sample(g).square().sum(0)
    return squares


def _conv2d_square_sums(module: nn.Conv2d, x, output_grad, params) -> dict[str, torch.Tensor]:
    dtype = _dtype_of(module)
    padding = 0 if module.padding == "valid" else module.padding
    # [B, in*kh*kw, L]: the input patch that each output position saw
    columns = F.unfold(x.to(dtype), module.kernel_size, module.dilation, padding, module.stride)
    g = output_grad.reshape(output_grad.shape[0], output_grad.shape[1], -1).to(dtype)  # [B, out, L]
    squares = {}
    if "weight" in params:
        per_sample = torch.einsum("bol,bil->boi", g, columns)
        squares["weight"] = per_sample.square().sum(0).reshape(module.weight.shape)
    if "bias" in params:
        squares["bias"] = g.sum(2).square().sum(0)
    return squares


def _token_square_sums(model: VisionTransformer, x, output_grad, params) -> dict[str, torch.Tensor]:
    # output_grad is d(sum log p)/d(tokens + pos_embed), [B, T, D]; per sample it
    # is exactly the gradient of pos_embed, and its row 0 that of cls_token.
    g = output_grad.to(_dtype_of(model))
    squares = {}
    if "pos_embed" in params:
        squares["pos_embed"] = g.square().sum(0).reshape(model.pos_embed.shape)
    if "cls_token" in params:
        squares["cls_token"] = g[:, 0].square().sum(0).reshape(model.cls_token.shape)
    return squares


# ============================================================= other scores
def magnitude_scores(model: nn.Module, param_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """|theta| per entry (detached copies); default: every named parameter."""
    names = _resolve_names(model, param_names, default=[n for n, _ in model.named_parameters()])
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs() for n in names}


def random_scores(
    model: nn.Module, param_names: list[str] | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) scores; one stream per parameter name, so dict order does not matter."""
    check_int("seed", seed, minimum=0)
    names = _resolve_names(model, param_names, default=[n for n, _ in model.named_parameters()])
    params = dict(model.named_parameters())
    scores = {}
    for name in names:
        generator = torch_generator(seed, "random-scores", name)
        scores[name] = torch.rand(params[name].shape, generator=generator).to(params[name].device)
    return scores


# ================================================================ calibration
@dataclass
class Calibration:
    """The outcome of `calibrate`.

    thresholds: per round, the boundary score in the rule's own units (e.g.
        least_sensitive: the largest Fisher score still trainable; nan when
        nothing is kept or nothing was scored).
    densities: fraction of eligible entries trainable after each round.
    """

    masks: dict[str, torch.Tensor]
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
    kept = torch.ones(total, dtype=torch.bool, device=device)  # flat over the eligible entries, in `names` order
    thresholds, densities = [], []
    try:
        for round_index in tqdm(range(1, rounds + 1), desc="calibration rounds", disable=not progress):
            rank = _rank_scores(rule, model, score_fn, originals, seed, round_index, device)
            rank[~kept] = math.inf  # after any negation: frozen entries can never come back
            keep_count = round((1.0 - sparsity) ** (round_index / rounds) * total)
            kept, boundary = _keep_lowest(rank, keep_count)
            del rank
            thresholds.append(-boundary if rule in KEEP_HIGHEST_RULES else boundary)
            densities.append(keep_count / total)
            if round_index < rounds:
                _attenuate_frozen(params, originals, kept)
    finally:
        _restore(params, originals)
    masks = _unflatten(kept, params)
    achieved = 1.0 - int(kept.sum()) / total
    return Calibration(masks, rule, sparsity, achieved, rounds, thresholds, densities)


def calibrate_masks(
    model: nn.Module,
    batches: Iterable,
    rule: str,
    sparsity: float,
    rounds: int = 1,
    param_names: list[str] | None = None,
    label_mode: str = "sampled",
    seed: int = 0,
    method: str = "hooks",
    chunk_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Masks (True = trainable) from Fisher scores on `batches`, calibrated in `rounds` rounds.

    `batches` must be re-iterable (a list): every round re-scores the same
    samples, now through the attenuated model. Round r draws its sampled
    labels from the stream (seed, 'fisher-labels', r). See `calibrate`.
    """
    check_fisher_options(label_mode, method, chunk_size)
    if isinstance(batches, Iterator):
        raise ConfigError("batches must be re-iterable (e.g. a list of (inputs, labels) pairs), "
                          f"got a one-shot {type(batches).__name__}; every calibration round re-reads it")
    names = _resolve_names(model, param_names, default=backbone_parameter_names(model))
    round_numbers = count(1)

    def fisher_of_current_model(current: nn.Module) -> dict[str, torch.Tensor]:
        generator = torch_generator(seed, "fisher-labels", next(round_numbers))
        return fisher_scores(current, batches, label_mode, names, generator, method, chunk_size, autocast_dtype)

    return calibrate(model, fisher_of_current_model, rule, sparsity, rounds, names, seed, progress).masks


def _rank_scores(rule, model, score_fn, originals, seed, round_index, device) -> torch.Tensor:
    """Flat rank scores over the eligible entries, lower = keep trainable."""
    names = list(originals)
    if rule in SENSITIVITY_RULES:
        scores = score_fn(model)
        _check_fisher_scores(scores, originals)
    elif rule == "random":
        scores = random_scores(model, names, seed=derive_seed(seed, "calibration-round", round_index))
    else:
        scores = {n: weight.abs() for n, weight in originals.items()}  # the original weights, never Fisher
    dtype = torch.float32
    for name in names:
        dtype = torch.promote_types(dtype, scores[name].dtype)
    flat = torch.cat([scores[n].detach().reshape(-1).to(device, dtype) for n in names])
    if rule in SENSITIVITY_RULES and not torch.isfinite(flat).all():
        bad = [n for n in names if not torch.isfinite(scores[n]).all()]
        raise ValueError(f"score_fn returned non-finite Fisher scores for {bad}")
    return flat.neg_() if rule in KEEP_HIGHEST_RULES else flat


def _check_fisher_scores(scores, originals) -> None:
    if not isinstance(scores, dict):
        raise ValueError(f"score_fn must return a dict name -> tensor, got {type(scores).__name__}")
    missing = [n for n in originals if n not in scores]
    if missing:
        raise ValueError(f"score_fn returned no scores for {missing}")
    wrong = [n for n, w in originals.items() if tuple(scores[n].shape) != tuple(w.shape)]
    if wrong:
        raise ValueError(f"score_fn returned scores shaped unlike their parameters for {wrong}")


def _keep_lowest(rank: torch.Tensor, keep_count: int) -> tuple[torch.Tensor, float]:
    """The keep_count lowest ranks (ties: earlier position first) and the largest rank kept."""
    values, order = torch.sort(rank, stable=True)
    kept = torch.zeros_like(rank, dtype=torch.bool)
    kept[order[:keep_count]] = True
    boundary = float(values[keep_count - 1]) if keep_count > 0 else math.nan
    return kept, boundary


def _unflatten(flat: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pieces = flat.split([p.numel() for p in params.values()])
    return {n: piece.reshape(p.shape).to(p.device).clone() for (n, p), piece in zip(params.items(), pieces)}


@torch.no_grad()
def _attenuate_frozen(params, originals, kept: torch.Tensor) -> None:
    # In place, from the originals (not cumulative): frozen = 0.1 * theta_0, kept = theta_0,
    # as the reference's forward w * mask with mask 0.1 on frozen entries.
    for name, keep in _unflatten(kept, params).items():
        params[name].copy_(torch.where(keep, originals[name], originals[name] * ATTENUATION))


@torch.no_grad()
def _restore(params, originals) -> None:
    for name, param in params.items():
        param.copy_(originals[name])
