"""How a run prepares its model before training: step 0 (a frozen head) and step 1 (masks).

    head='train'   the random linear head is trained with the backbone (plain fine-tuning)
    head='ridge'   closed-form ridge head on frozen features (heads.py), then frozen
    mask_rule      None (dense) or a calibration rule (sensitivity.RULES)

Nothing is pooled in FL: every client computes its head statistics and its Fisher sums on its
own shard with the global model; the server adds them (the statistics of the union) and
thresholds, then broadcasts one mask. A centralized run is the same computation with one client
holding the whole train split. Validation and test data never fit a head or a mask.

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
from torch import nn
from tqdm.auto import tqdm

from .checks import check_choice, check_float, check_int
from .data import DataBundle, make_batch, numpy_rng, torch_generator
from .heads import LAMBDA_TOLERANCE, RIDGE_LAMBDAS, client_features, federated_ridge_head
from .models import backbone_parameter_names, head_parameter_names
from .runs import atomic_torch_save, config_id
from .sensitivity import LABEL_MODES, RULES, calibrate, fisher_sums, pack_masks, unpack_masks

HEAD_MODES = ("train", "ridge")
ELIGIBLE_SETS = ("backbone", "blocks", "matrices")
FISHER_CHUNK = 32  # samples per Fisher forward/backward (see sensitivity.DEFAULT_CHUNK for the memory)


@dataclass(frozen=True)
class FineTuneSpec:
    """How a run prepares its model: the step-0 head and the sparse masks."""

    head: str = "train"              # 'train' | 'ridge' (frozen after step 0)
    ridge_lambda: float | None = 1.0  # relative ridge penalty (heads.solve_ridge); None: chosen on validation
    mask_rule: str | None = None     # None = dense; else one of sensitivity.RULES
    sparsity: float = 0.9            # fraction of eligible entries frozen
    calibration_rounds: int = 4      # R in TaLoS: density d^(r/R) in round r
    calibration_samples: int = 1600  # samples scored per round in total (split evenly over clients)
    label_mode: str = "sampled"      # Fisher labels drawn from the model ('sampled') or the true ones
    eligible: str = "backbone"       # 'backbone' (all but the head) | 'blocks' | 'matrices' (2-D, blocks)

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

    @property
    def is_sparse(self) -> bool:
        return self.mask_rule is not None

    def identity(self) -> dict:
        """The fields that change results: calibration fields for sparse runs, lambda for ridge heads."""
        values = asdict(self)
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


def prepare(run, model: nn.Module, data: DataBundle, spec: FineTuneSpec, seed: int, img_size: int,
            precision: str, shards: list[np.ndarray], head_cache: Path | None) -> Prepared:
    """Steps 0 and 1 from per-client computations (one client = centralized); stored in the run."""
    if run.has_artifact("prepared.pt"):
        return load_prepared(run.dir, model, data.device)
    info = {}
    if spec.head == "ridge":
        weight, bias, info = fit_ridge_head(model, data, spec, img_size, precision, shards, head_cache)
        install_head(model, weight, bias)
    names = backbone_parameter_names(model) + (head_parameter_names(model) if spec.head == "train" else [])
    prepared = Prepared(names, info=dict(info))
    if spec.is_sparse:
        eligible = eligible_names(model, spec.eligible)
        score_fn = federated_fisher(data, calibration_samples(shards, spec.calibration_samples, seed),
                                    img_size, spec.label_mode, eligible, seed)
        result = calibrate(model, score_fn, spec.mask_rule, spec.sparsity, spec.calibration_rounds,
                           eligible, seed)
        prepared.masks = result.masks
        prepared.info.update(achieved_sparsity=result.achieved_sparsity, thresholds=result.thresholds,
                             round_densities=result.densities)
    head = model.get_classifier()
    run.save_artifact("prepared.pt", {
        "trainable_names": prepared.trainable_names, "info": json.dumps(prepared.info),
        "head": {"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu()},
        "masks": pack_masks(prepared.masks) if prepared.masks is not None else None})
    return prepared


def load_prepared(run_dir: str | Path, model: nn.Module | None = None, device="cpu") -> Prepared:
    """A run's stored preparation (prepared.pt); with `model`, its stored head is installed."""
    stored = torch.load(Path(run_dir) / "prepared.pt", map_location="cpu", weights_only=True)
    if model is not None:
        install_head(model, stored["head"]["weight"], stored["head"]["bias"])
    masks = unpack_masks(stored["masks"], device=device) if stored["masks"] is not None else None
    return Prepared(stored["trainable_names"], masks, json.loads(stored["info"]))


def install_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))


def head_cache_path(root: str | Path, spec: FineTuneSpec, **context) -> Path | None:
    """Where a ridge head is shared by every run that would fit the very same head (None: no head).

    `context` names what the head depends on besides lambda: model, weights, dataset, shards. A
    head chosen on validation is keyed by the grid and tolerance it was chosen with.
    """
    if spec.head == "train":
        return None
    ridge = spec.ridge_lambda if spec.ridge_lambda is not None else \
        {"validation": list(RIDGE_LAMBDAS), "tolerance": LAMBDA_TOLERANCE}
    return Path(root) / "cache" / f"head-{config_id({**context, 'ridge_lambda': ridge})}.pt"


def fit_ridge_head(model, data, spec, img_size, precision, shards, cache: Path | None):
    """(weight, bias, info) of the federated ridge head, read from `cache` when another run fitted it.

    A penalty chosen on validation costs one more feature pass, over the server's validation split.
    """
    if cache is not None and cache.is_file():
        try:
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            return stored["weight"], stored["bias"], stored["info"]
        except Exception:  # an unreadable cache entry is recomputed, never trusted
            pass
    feats = [client_features(model, data.train, idx, img_size, precision)
             for idx in tqdm(shards, desc="step 0: client features", leave=False)]
    labels = [data.train.labels[torch.as_tensor(idx, device=data.device)] for idx in shards]
    val = {} if spec.ridge_lambda is not None else {
        "val_feats": client_features(model, data.val, np.arange(len(data.val)), img_size, precision),
        "val_labels": data.val.labels}
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
    return [numpy_rng(seed, "calibration-samples", k).permutation(shard)[:per_client]
            for k, shard in enumerate(shards)]


def federated_fisher(data, samples: list[np.ndarray], img_size, label_mode, names, seed):
    """score_fn(model) for calibrate(): every client's Fisher sums on its own samples, added.

    Each call is one calibration round; labels come from a stream per (seed, round, client), so
    rounds and clients never share draws. The summed sums over the total count is the Fisher of
    the union of the clients' samples.
    """
    rounds_done = []

    def score_fn(model):
        round_index = len(rounds_done)
        rounds_done.append(round_index)
        totals, count = None, 0
        for client, indices in enumerate(samples):
            generator = torch_generator(seed, "fisher-labels", round_index, client, device=data.device)
            index = torch.as_tensor(indices, device=data.device)
            batches = (make_batch(data.train, chunk, img_size) for chunk in index.split(FISHER_CHUNK))
            sums, n = fisher_sums(model, batches, label_mode, names, generator=generator,
                                  chunk_size=FISHER_CHUNK)
            totals = sums if totals is None else {k: totals[k].add_(sums[k]) for k in totals}
            count += n
        return {k: v / count for k, v in totals.items()}

    return score_fn
