"""How a run prepares its model before training: step 0 (a frozen head) and step 1 (masks).

    head='train'   the random linear head is trained with the backbone (plain fine-tuning)
    head='ridge'   closed-form ridge head on frozen features, then frozen
    mask_rule      None (dense) or a calibration rule (masks.RULES)

Nothing is pooled in FL: every client computes its head statistics and its Fisher sums on its
own shard with the global model; the server adds them (the statistics of the union) and
thresholds, then broadcasts one mask. A centralized run is the same computation with one client
holding the whole train split. Test data never reach a head or a mask; the validation split only
chooses the ridge penalty, when asked to.

The ridge head is federated exactly (Fed3R, Fani et al., ICML 2024): each client k extracts
frozen-backbone features Phi_k (with a bias column) and sends A_k = Phi_k^T Phi_k and
b_k = Phi_k^T Y_k (Y one-hot). The server solves (A + lambda' I) W = b with A = sum_k A_k, b = sum_k b_k. Sums
of per-client statistics are the statistics of the union, so the head equals the centralized
ridge solution for any sharding and any client order (float64 throughout).

A ridge head regresses one-hot targets, so its logits live in [0, 1] and a softmax over them is
nearly flat. The logit scale s is chosen the same federated way: each client sends its summed
cross-entropy for every s on a grid, the server keeps the s with the lowest total. The scale
matters for the sampled-label Fisher, whose labels come from this softmax.

The penalty is either fixed or chosen on the server's validation split from RIDGE_LAMBDAS
(choose_ridge_lambda): A and b are summed once, and solving for each penalty is cheap.

What a run prepared is stored in its folder (prepared.pt), so a resumed run does not calibrate
again. A ridge head depends only on the backbone, the data and the shards, so it is also cached
in <results root>/cache/ and shared by every run that would fit the very same head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checks import check_choice, check_float, check_int
from .data import DataBundle, ImageSet, make_batch, numpy_rng, torch_generator
from .fisher import DEFAULT_CHUNK, LABEL_MODES, fisher_sums
from .masks import RULES, Calibration, calibrate, pack_masks, unpack_masks
from .models import autocast, backbone_parameter_names, head_parameter_names, input_size, resolve_precision
from .runs import atomic_torch_save, config_id

HEAD_MODES = ("train", "ridge")
ELIGIBLE_SETS = ("backbone", "blocks", "matrices")


# --------------------------------------------------------------------------- step 0: the ridge head

LOGIT_SCALES = tuple(float(s) for s in np.logspace(0, 3, 13))  # 1 ... 1000
RIDGE_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative penalties a validation choice picks from
LAMBDA_TOLERANCE = 0.01  # validation accuracy given up for a larger, steadier penalty


@torch.inference_mode()
def client_features(
    model: nn.Module, image_set: ImageSet, indices, img_size: int, *, precision: str, batch_size: int = 256
) -> torch.Tensor:
    """Frozen-backbone features [n, D] (float32) of positions `indices`, no augmentation."""
    model.eval()
    index = torch.as_tensor(indices, device=image_set.labels.device)
    parts = []
    for chunk in index.split(batch_size):
        inputs, _ = make_batch(image_set, chunk, img_size)
        with autocast(inputs.device, precision):
            parts.append(model.forward_head(model.forward_features(inputs), pre_logits=True).float())
    return torch.cat(parts)


def ridge_statistics(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Phi^T Phi and b = Phi^T Y for one client (float64, Phi with a bias column)."""
    phi = F.pad(feats.double(), (0, 1), value=1.0)  # the bias column
    return phi.T @ phi, phi.T @ F.one_hot(labels, num_classes).double()


def solve_ridge(
    a_sum: torch.Tensor, b_sum: torch.Tensor, ridge_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (A + lambda * mean(diag A) * I) W = b; returns the head's weight [C, D] and bias [C].

    The penalty is relative to the mean eigenvalue of A (trace / dimension), so one value suits
    any feature scale and sample count. A nearly unregularised head puts large weights on
    low-variance feature directions; scaled to a useful logit range, it turns small feature
    changes into large logit changes and large gradients, which make unclipped fine-tuning under the
    frozen head diverge (hence FineTuneSpec.max_grad_norm).
    """
    eye = torch.eye(len(a_sum)).to(a_sum)  # a_sum's dtype and device
    solution = torch.linalg.solve(a_sum + ridge_lambda * torch.diagonal(a_sum).mean() * eye, b_sum)
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def choose_ridge_lambda(lambdas, val_accuracies, tolerance: float = LAMBDA_TOLERANCE) -> float:
    """The largest penalty whose validation accuracy is within `tolerance` of the best one.

    Ties and near-ties go to the larger penalty, whose head has smaller weights on low-variance
    directions and so is less prone to make fine-tuning diverge (solve_ridge). That is a
    preference, not a guarantee: validation accuracy of the head alone cannot see how stable
    fine-tuning under it will be, and a clearly more accurate small penalty is still chosen; the
    gradient clipping of the runs under the head (max_grad_norm) is what keeps them from diverging.
    """
    best = max(val_accuracies)
    return max(lam for lam, acc in zip(lambdas, val_accuracies) if acc >= best - tolerance)


def head_accuracy(
    head: tuple[torch.Tensor, torch.Tensor], feats: torch.Tensor, labels: torch.Tensor
) -> float:
    """Top-1 accuracy of a linear head (weight, bias) on features."""
    weight, bias = head
    logits = feats.double() @ weight.T + bias
    return float((logits.argmax(1) == labels).double().mean())


def scaled_losses(head: tuple[torch.Tensor, torch.Tensor], feats, labels) -> torch.Tensor:
    """One client's summed cross-entropy of a linear head (weight, bias) at each s of LOGIT_SCALES."""
    weight, bias = head
    logits = feats.double() @ weight.T + bias
    losses = [F.cross_entropy(scale * logits, labels, reduction="sum") for scale in LOGIT_SCALES]
    return torch.stack(losses)


def federated_ridge_head(
    client_feats: list[torch.Tensor],
    client_labels: list[torch.Tensor],
    num_classes: int,
    ridge_lambda: float | None,
    *,
    val_feats: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(weight, bias, info) of the ridge head from per-client statistics, scale chosen federatedly.

    ridge_lambda=None chooses it from RIDGE_LAMBDAS by accuracy on (val_feats, val_labels), which
    the server holds; info then has the accuracy per penalty. Nothing but A_k, b_k and a vector
    of loss sums leaves client k.
    """
    stats = [ridge_statistics(f, y, num_classes) for f, y in zip(client_feats, client_labels)]
    a_sum = sum(a for a, _ in stats)
    b_sum = sum(b for _, b in stats)
    chosen = {}
    if ridge_lambda is None:
        accuracies = [
            head_accuracy(solve_ridge(a_sum, b_sum, lam), val_feats, val_labels) for lam in RIDGE_LAMBDAS
        ]
        ridge_lambda = choose_ridge_lambda(RIDGE_LAMBDAS, accuracies)
        chosen = {"val_accuracy_per_lambda": {f"{lam:g}": acc for lam, acc in zip(RIDGE_LAMBDAS, accuracies)}}
    weight, bias = solve_ridge(a_sum, b_sum, ridge_lambda)
    # Each client sends its training loss at every candidate scale; the server adds them up.
    losses = sum(
        scaled_losses((weight, bias), feats, labels) for feats, labels in zip(client_feats, client_labels)
    )
    best = int(torch.argmin(losses))
    scale = LOGIT_SCALES[best]
    info = {
        "ridge_lambda": ridge_lambda,
        "logit_scale": scale,
        "train_loss_at_scale": float(losses[best]) / sum(len(y) for y in client_labels),
        **chosen,
    }
    return (scale * weight).float(), (scale * bias).float(), info


# --------------------------------------------------------------------------- the spec and the preparation


@dataclass(frozen=True)
class FineTuneSpec:
    """How a run prepares its model (the step-0 head and the sparse masks) and how it clips gradients.

    max_grad_norm clips the global norm of the trainable gradient at every step (optim.SparseSGDM).
    Notebooks 04 and 05 set it to 1.0 for every run under the frozen head, as the TaLoS reference code
    clips its fine-tuning under a frozen head; None (plain fine-tuning, notebooks 01-03) never clips.
    """

    head: str = "train"  # 'train' | 'ridge' (frozen after step 0)
    ridge_lambda: float | None = 1.0  # relative ridge penalty (solve_ridge); None: chosen on validation
    mask_rule: str | None = None  # None = dense; else one of masks.RULES
    sparsity: float = 0.9  # fraction of eligible entries frozen
    calibration_rounds: int = 4  # R in TaLoS: density d^(r/R) in round r
    calibration_samples: int = 1600  # samples scored per round in total (split evenly over clients)
    label_mode: str = "sampled"  # Fisher labels drawn from the model ('sampled') or the true ones
    eligible: str = "backbone"  # 'backbone' (all but the head) | 'blocks' | 'matrices' (2-D, blocks)
    max_grad_norm: float | None = None  # clip the trainable gradient's global norm each step; None: never

    def __post_init__(self):
        check_choice("head", self.head, HEAD_MODES)
        if self.ridge_lambda is not None:
            check_float("ridge_lambda", self.ridge_lambda, 0.0, None, low_open=True)
        check_choice("mask_rule", self.mask_rule, (None, *RULES))
        check_float("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_int("calibration_rounds", self.calibration_rounds, minimum=1)
        check_int("calibration_samples", self.calibration_samples, minimum=1)
        check_choice("label_mode", self.label_mode, LABEL_MODES)
        check_choice("eligible", self.eligible, ELIGIBLE_SETS)
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", self.max_grad_norm, 0.0, None, low_open=True)

    @property
    def is_sparse(self) -> bool:
        return self.mask_rule is not None

    def identity(self) -> dict:
        """The fields that change results: calibration fields for sparse runs, lambda for ridge heads,
        max_grad_norm when set (so runs that do not clip keep their identity)."""
        values = asdict(self)
        if self.max_grad_norm is None:
            values.pop("max_grad_norm")
        else:  # 1 and 1.0 name the same run
            values["max_grad_norm"] = float(self.max_grad_norm)
        if not self.is_sparse:
            for key in ("sparsity", "calibration_rounds", "calibration_samples", "label_mode", "eligible"):
                values.pop(key)
        if self.head != "ridge":
            values.pop("ridge_lambda")
        return values

    def short_name(self) -> str:
        head = "" if self.head == "train" else f"-{self.head}"
        if not self.is_sparse:
            return head
        return f"{head}-{self.mask_rule}-sp{self.sparsity:g}-R{self.calibration_rounds}"


@dataclass
class Prepared:
    """The trainable parameters after steps 0 and 1, their masks (None = dense) and what was chosen."""

    trainable_names: list[str]
    masks: dict[str, torch.Tensor] | None = None
    info: dict = field(default_factory=dict)


def prepare(
    run,
    model: nn.Module,
    data: DataBundle,
    spec: FineTuneSpec,
    *,
    seed: int,
    img_size: int,
    precision: str,
    shards: list[np.ndarray],
    head_cache: Path | None,
) -> Prepared:
    """Steps 0 and 1 from per-client computations (one client = centralized); stored in the run."""
    if run.has_artifact("prepared.pt"):
        return load_prepared(run.dir, model, data.device)
    prepared = Prepared(backbone_parameter_names(model))
    if spec.head == "train":
        prepared.trainable_names += head_parameter_names(model)
    else:  # the ridge head, frozen from now on
        weight, bias, prepared.info = fit_ridge_head(
            model, data, spec, img_size, precision=precision, shards=shards, cache=head_cache
        )
        install_head(model, weight, bias)
    if spec.is_sparse:
        result = calibrate_mask(model, data, spec, img_size, shards=shards, seed=seed)
        prepared.masks = result.masks
        prepared.info.update(
            achieved_sparsity=result.achieved_sparsity,
            thresholds=result.thresholds,
            round_densities=result.densities,
        )
    save_prepared(run, model, prepared)
    return prepared


def calibrate_mask(model, data, spec, img_size, *, shards, seed) -> Calibration:
    """Step 1: the spec's mask, calibrated on the federated Fisher of the clients' calibration samples."""
    eligible = eligible_names(model, spec.eligible)
    score_fn = federated_fisher(
        data,
        calibration_samples(shards, spec.calibration_samples, seed),
        img_size,
        spec.label_mode,
        names=eligible,
        seed=seed,
    )
    return calibrate(
        model,
        score_fn,
        spec.mask_rule,
        spec.sparsity,
        rounds=spec.calibration_rounds,
        param_names=eligible,
        seed=seed,
    )


def save_prepared(run, model: nn.Module, prepared: Prepared) -> None:
    """prepared.pt: the trainable names, the step-0 head, the bit-packed masks and the info."""
    head = model.get_classifier().state_dict()  # weight and bias
    run.save_artifact(
        "prepared.pt",
        {
            "trainable_names": prepared.trainable_names,
            "info": json.dumps(prepared.info),
            "head": {name: value.cpu() for name, value in head.items()},
            "masks": pack_masks(prepared.masks) if prepared.masks is not None else None,
        },
    )


def load_prepared(run_dir: str | Path, model: nn.Module | None = None, device="cpu") -> Prepared:
    """A run's stored preparation (prepared.pt); with `model`, its stored head is installed."""
    stored = torch.load(Path(run_dir) / "prepared.pt", map_location="cpu", weights_only=True)
    if model is not None:
        install_head(model, **stored["head"])  # weight and bias
    masks = unpack_masks(stored["masks"], device=device) if stored["masks"] is not None else None
    return Prepared(stored["trainable_names"], masks, json.loads(stored["info"]))


def install_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(weight)  # copy_ casts to the head's dtype and device
        head.bias.copy_(bias)


def head_cache_path(root: str | Path, spec: FineTuneSpec, **context) -> Path | None:
    """Where a ridge head is shared by every run that would fit the very same head (None: no head).

    `context` names what the head depends on besides lambda: model, weights, dataset, shards. A
    head chosen on validation is keyed by the grid and tolerance it was chosen with.
    """
    if spec.head == "train":
        return None
    ridge = (
        spec.ridge_lambda
        if spec.ridge_lambda is not None
        else {"validation": list(RIDGE_LAMBDAS), "tolerance": LAMBDA_TOLERANCE}
    )
    return Path(root) / "cache" / f"head-{config_id({**context, 'ridge_lambda': ridge})}.pt"


def run_head_cache(ws, config, device=None, **shards) -> Path | None:
    """head_cache_path of a run config: its model, weights, data set, seed, input size and the precision
    it trains at on `device` (default: the workspace's), and `shards`, what names its clients' data."""
    return head_cache_path(
        ws.root,
        config.finetune,
        model=config.model,
        weights=ws.weights_path,
        dataset=config.dataset,
        seed=config.seed,
        img_size=input_size(config.model, config.img_size),
        precision=resolve_precision(config.precision, device or ws.device),
        **shards,
    )


def fit_ridge_head(model, data, spec, img_size, *, precision, shards, cache: Path | None):
    """(weight, bias, info) of the federated ridge head, read from `cache` when another run fitted it.

    A penalty chosen on validation costs one more feature pass, over the server's validation split.
    """
    if cache is not None and cache.is_file():
        try:
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            return stored["weight"], stored["bias"], stored["info"]
        except Exception:  # an unreadable cache entry is recomputed, never trusted
            pass
    feats = [
        client_features(model, data.train, idx, img_size, precision=precision)
        for idx in tqdm(shards, desc="step 0: client features", leave=False)
    ]
    labels = [data.train.labels[torch.as_tensor(idx, device=data.device)] for idx in shards]
    val = {}
    if spec.ridge_lambda is None:  # chosen on the server's validation split, never read otherwise
        val["val_feats"] = client_features(
            model, data.val, np.arange(len(data.val)), img_size, precision=precision
        )
        val["val_labels"] = data.val.labels
    weight, bias, info = federated_ridge_head(feats, labels, data.num_classes, spec.ridge_lambda, **val)
    if cache is not None:
        atomic_torch_save({"weight": weight.cpu(), "bias": bias.cpu(), "info": info}, cache)
    return weight, bias, info


def eligible_names(model: nn.Module, eligible: str) -> list[str]:
    """The parameters a mask may cover: 'backbone', 'blocks', or 'matrices' (2-D block weights)."""
    check_choice("eligible", eligible, ELIGIBLE_SETS)
    params = dict(model.named_parameters())
    names = backbone_parameter_names(model)
    if eligible == "blocks":
        return [n for n in names if n.startswith("blocks.")]
    if eligible == "matrices":
        return [n for n in names if n.startswith("blocks.") and params[n].ndim == 2]
    return names


def calibration_samples(shards, total: int, seed: int) -> list[np.ndarray]:
    """Each client's scoring samples: an equal share of `total`, drawn from its own shard."""
    per_client = max(1, -(-total // len(shards)))
    return [
        numpy_rng(seed, "calibration-samples", k).permutation(shard)[:per_client]
        for k, shard in enumerate(shards)
    ]


def federated_fisher(data, samples: list[np.ndarray], img_size, label_mode, *, names, seed):
    """score_fn(model) for calibrate(): every client's Fisher sums on its own samples, added.

    Each call is one calibration round; labels come from a stream per (seed, round, client), so
    rounds and clients never share draws. The summed sums over the total count is the Fisher of
    the union of the clients' samples.
    """
    rounds_done = []

    def score_fn(model):
        round_index = len(rounds_done)
        rounds_done.append(round_index)
        totals = {}
        count = 0
        for client, indices in enumerate(samples):
            generator = torch_generator(seed, "fisher-labels", round_index, client, device=data.device)
            index = torch.as_tensor(indices, device=data.device)
            # batches of one vmap chunk each (see fisher.DEFAULT_CHUNK for the memory)
            batches = (make_batch(data.train, chunk, img_size) for chunk in index.split(DEFAULT_CHUNK))
            sums, n = fisher_sums(model, batches, label_mode, names, generator=generator)
            for name, client_sum in sums.items():  # the server adds the client's sums
                totals[name] = totals.get(name, 0) + client_sum
            count += n
        return {name: total / count for name, total in totals.items()}

    return score_fn
