"""Sparse fine-tuning set-up: step 0 (a frozen head) and step 1 (gradient masks).

A run's FineTuneSpec says how to prepare the model before training:

    head='train'  the random linear head is trained with the backbone (plain fine-tuning)
    head='ridge'  closed-form ridge head on frozen features, then frozen (heads.py)
    head='probe'  head trained on frozen features by FedAvg / SGD, then frozen
    mask_rule     None (dense) or a calibration rule (sensitivity.RULES)

Centralized runs calibrate on samples of the pooled train split. Federated
runs never pool: every client scores its own samples with the global model,
the server adds the Fisher sums (the Fisher of the union) and thresholds, then
broadcasts the mask ('global' scope); or each client keeps a mask calibrated
on its own data alone ('local' scope). Validation and test data are never
used to fit a head or a mask.

What a run prepared (head weights, masks) is stored in its folder, so a
resumed run does not calibrate again. Ridge heads, which are identical for
every run that shares the data split, shards and lambda, are also cached in
<results root>/cache/.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import models
from .checks import ConfigError, check_choice, check_float, check_int
from .data import DataBundle, make_batch
from .heads import HeadFit, client_features, federated_linear_probe, federated_ridge_head
from .masks import count_trainable, pack_masks, unpack_masks
from .runs import config_id
from .seeding import derive_seed, numpy_rng, torch_generator
from .sensitivity import RULES, calibrate, fisher_sums
from .storage import atomic_torch_save

HEAD_MODES = ("train", "ridge", "probe")
ELIGIBLE_SETS = ("backbone", "blocks", "matrices")
MASK_SCOPES = ("global", "local")
LABEL_MODES = ("sampled", "true")
FISHER_CHUNK = 64  # samples per Fisher forward/backward: bounds memory at 224x224


@dataclass(frozen=True)
class FineTuneSpec:
    """How a run prepares its model: the step-0 head and the sparse masks."""

    head: str = "train"              # 'train' | 'ridge' | 'probe' (the last two are frozen afterwards)
    ridge_lambda: float = 1.0        # ridge penalty, relative to the mean eigenvalue of Phi^T Phi (see heads.solve_ridge)
    probe_rounds: int = 200          # linear probe: FedAvg rounds on cached features
    probe_local_steps: int = 4       # linear probe: SGD steps per client per round
    probe_lr: float = 0.1            # linear probe: SGD learning rate (momentum 0.9, batch 128)
    mask_rule: str | None = None     # None = dense; else one of sensitivity.RULES
    sparsity: float = 0.9            # fraction of eligible entries frozen
    calibration_rounds: int = 4      # R in TaLoS: density d^(r/R) in round r
    calibration_samples: int = 1600  # samples scored per round in total (split evenly over clients in FL)
    label_mode: str = "sampled"      # Fisher labels drawn from the model ('sampled') or the true ones
    eligible: str = "backbone"       # 'backbone' (all but the head) | 'blocks' | 'matrices' (2-D weights of blocks)
    mask_scope: str = "global"       # FL only: one mask for all ('global') or one per client ('local')

    def __post_init__(self):
        check_choice("head", self.head, HEAD_MODES)
        check_float("ridge_lambda", self.ridge_lambda, 0.0, None, low_open=True)
        check_int("probe_rounds", self.probe_rounds, minimum=1)
        check_int("probe_local_steps", self.probe_local_steps, minimum=1)
        check_float("probe_lr", self.probe_lr, 0.0, None, low_open=True)
        check_choice("mask_rule", self.mask_rule, (None, *RULES))
        check_float("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_int("calibration_rounds", self.calibration_rounds, minimum=1)
        check_int("calibration_samples", self.calibration_samples, minimum=1)
        check_choice("label_mode", self.label_mode, LABEL_MODES)
        check_choice("eligible", self.eligible, ELIGIBLE_SETS)
        check_choice("mask_scope", self.mask_scope, MASK_SCOPES)

    @property
    def is_sparse(self) -> bool:
        return self.mask_rule is not None

    def identity(self) -> dict:
        """The fields that change results: calibration fields only for sparse runs, probe fields only for probes."""
        values = asdict(self)
        if not self.is_sparse:
            for key in ("sparsity", "calibration_rounds", "calibration_samples", "label_mode", "eligible", "mask_scope"):
                values.pop(key)
        if self.head != "probe":
            for key in ("probe_rounds", "probe_local_steps", "probe_lr"):
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
class PreparedModel:
    """The trainable parameters and their masks after step 0 and step 1."""

    trainable_names: list[str]
    masks: dict[str, torch.Tensor] | None = None                 # global scope (or centralized)
    client_masks: dict[int, dict] = field(default_factory=dict)  # local scope: client -> packed masks
    info: dict = field(default_factory=dict)

    def masks_for_client(self, client: int, device) -> dict[str, torch.Tensor] | None:
        if client in self.client_masks:
            return unpack_masks(self.client_masks[client], device=device)
        return self.masks


# --------------------------------------------------------------------------- public

def prepare_centralized(run, model: nn.Module, data: DataBundle, spec: FineTuneSpec, seed: int,
                        img_size: int, precision: str, head_cache: Path | None = None) -> PreparedModel:
    """Step 0 and step 1 on the pooled train split (the centralized baseline).

    head_cache: a file where a fitted head is shared with other runs that
    would fit the very same head (same model, data, shards and head fields).
    """
    all_train = [np.arange(len(data.train))]
    return _prepare(run, model, data, spec, seed, img_size, precision, all_train,
                    clients_per_round=1, head_cache=head_cache)


def prepare_federated(run, model: nn.Module, data: DataBundle, spec: FineTuneSpec, seed: int,
                      img_size: int, precision: str, shards: list[np.ndarray], clients_per_round: int,
                      head_cache: Path | None = None) -> PreparedModel:
    """Step 0 and step 1 from per-client computations only (no pooled data)."""
    return _prepare(run, model, data, spec, seed, img_size, precision, shards,
                    clients_per_round=clients_per_round, head_cache=head_cache)


def head_cache_path(root: str | Path, spec: FineTuneSpec, **context) -> Path | None:
    """Where a fitted step-0 head is shared by every run that would fit the very same head.

    `context` names what the head depends on besides its own fields (model,
    weights, dataset, and for FL the shards: sharding, clients, seed). None
    for head='train', which fits nothing.
    """
    if spec.head == "train":
        return None
    head_fields = {k: v for k, v in spec.identity().items() if k.startswith(("head", "ridge", "probe"))}
    return Path(root) / "cache" / f"head-{config_id({**context, 'head': head_fields})}.pt"


def eligible_names(model: nn.Module, eligible: str) -> list[str]:
    """The parameters a mask may cover: 'backbone', 'blocks', or 'matrices' (2-D block weights)."""
    check_choice("eligible", eligible, ELIGIBLE_SETS)
    params = dict(model.named_parameters())
    names = models.backbone_parameter_names(model)
    if eligible == "blocks":
        names = [n for n in names if n.startswith("blocks.")]
    elif eligible == "matrices":
        names = [n for n in names if n.startswith("blocks.") and params[n].ndim == 2]
    return names


# --------------------------------------------------------------------------- preparation

def _prepare(run, model, data, spec, seed, img_size, precision, shards, clients_per_round, head_cache):
    if run.has_artifact("prepared.pt"):
        return _load_prepared(run, model, data.device)
    info: dict = {}
    if spec.head != "train":
        fit = _fit_head(model, data, spec, seed, img_size, precision, shards, clients_per_round, head_cache)
        fit.install(model)
        info.update(fit.info)
    prepared = _calibrate(model, data, spec, seed, img_size, precision, shards)
    prepared.info.update(info)
    _store_prepared(run, model, spec, prepared)
    return prepared


def _fit_head(model, data, spec, seed, img_size, precision, shards, clients_per_round, head_cache) -> HeadFit:
    cached = _read_cache(head_cache)
    if cached is not None:
        return HeadFit(cached["weight"].to(data.device), cached["bias"].to(data.device), cached["info"])
    feats = [client_features(model, data.train, idx, img_size, precision)
             for idx in tqdm(shards, desc="step 0: client features", leave=False)]
    labels = [data.train.labels[torch.as_tensor(idx, device=data.device)] for idx in shards]
    if spec.head == "ridge":
        fit = federated_ridge_head(feats, labels, data.num_classes, spec.ridge_lambda)
    else:
        fit = federated_linear_probe(feats, labels, data.num_classes, spec.probe_rounds, spec.probe_local_steps,
                                     clients_per_round, batch_size=128, lr=spec.probe_lr, seed=seed)
    _write_cache(head_cache, {"weight": fit.weight.cpu(), "bias": fit.bias.cpu(), "info": fit.info})
    return fit


def _calibrate(model, data, spec, seed, img_size, precision, shards) -> PreparedModel:
    head_names = models.head_parameter_names(model)
    head_trained = head_names if spec.head == "train" else []
    if not spec.is_sparse:
        backbone = models.backbone_parameter_names(model)
        return PreparedModel(trainable_names=backbone + head_trained)
    names = eligible_names(model, spec.eligible)
    samples = _calibration_samples(shards, spec.calibration_samples, seed)
    if spec.mask_scope == "global" or len(shards) == 1:
        score_fn = _fisher_score_fn(data, dict(enumerate(samples)), img_size, spec.label_mode, names, seed)
        result = calibrate(model, score_fn, spec.mask_rule, spec.sparsity, spec.calibration_rounds, names, seed)
        return PreparedModel(names + head_trained, masks=result.masks, info=_calibration_info(result))
    client_masks, achieved = {}, []
    for client, client_samples in enumerate(tqdm(samples, desc="step 1: local masks", leave=False)):
        score_fn = _fisher_score_fn(data, {client: client_samples}, img_size, spec.label_mode, names, seed)
        result = calibrate(model, score_fn, spec.mask_rule, spec.sparsity, spec.calibration_rounds, names,
                           derive_seed(seed, "local-mask", client))
        client_masks[client] = pack_masks(result.masks)
        achieved.append(result.achieved_sparsity)
    return PreparedModel(names + head_trained, client_masks=client_masks,
                         info={"achieved_sparsity": float(np.mean(achieved)), "mask_scope": "local"})


def _calibration_samples(shards, total: int, seed: int) -> list[np.ndarray]:
    """Each client's scoring samples: an equal share of `total`, drawn from its own shard."""
    per_client = max(1, -(-total // len(shards)))
    return [numpy_rng(seed, "calibration-samples", k).permutation(shard)[:per_client]
            for k, shard in enumerate(shards)]


def _fisher_score_fn(data, samples_by_client: dict[int, np.ndarray], img_size, label_mode, names, seed):
    """score_fn(model) for calibrate(): Fisher summed over clients, each on its own samples.

    Every call is one calibration round; labels are drawn from a stream per
    (seed, round, client), so rounds and clients never share draws. The sum
    of per-client sums over the total count is the Fisher of the union.
    """
    round_counter = {"round": 0}

    def score_fn(model):
        round_index = round_counter["round"]
        round_counter["round"] += 1
        totals, count = None, 0
        for client, indices in samples_by_client.items():
            generator = torch_generator(seed, "fisher-labels", round_index, client, device=data.device)
            sums, n = fisher_sums(model, _lazy_batches(data, indices, img_size), label_mode, names,
                                  generator=generator, chunk_size=FISHER_CHUNK)
            totals = sums if totals is None else {k: totals[k].add_(sums[k]) for k in totals}
            count += n
        return {k: v / count for k, v in totals.items()}

    return score_fn


def _lazy_batches(data, indices, img_size):
    index = torch.as_tensor(indices, device=data.device)
    for chunk in index.split(FISHER_CHUNK):
        yield make_batch(data.train, chunk, img_size)


def _calibration_info(result) -> dict:
    return {"achieved_sparsity": result.achieved_sparsity, "thresholds": list(result.thresholds),
            "round_densities": list(result.densities), "mask_scope": "global"}


# --------------------------------------------------------------------------- storage

def _store_prepared(run, model, spec, prepared: PreparedModel) -> None:
    head = model.get_classifier()
    run.save_artifact("prepared.pt", {
        "trainable_names": prepared.trainable_names,
        "head": {"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu()},
        "masks": pack_masks(prepared.masks) if prepared.masks is not None else None,
        "client_masks": prepared.client_masks,
        "info": json.dumps(prepared.info),
        "trainable_entries": count_trainable(prepared.masks) if prepared.masks is not None else -1,
    })


def load_run_masks(run_dir: str | Path, device="cpu") -> dict[str, torch.Tensor] | None:
    """The global masks a sparse run calibrated (from its prepared.pt); None for dense or local-scope runs."""
    stored = torch.load(Path(run_dir) / "prepared.pt", map_location="cpu", weights_only=True)
    return unpack_masks(stored["masks"], device=device) if stored["masks"] is not None else None


def _load_prepared(run, model, device) -> PreparedModel:
    stored = run.load_artifact("prepared.pt")
    HeadFit(stored["head"]["weight"], stored["head"]["bias"], {}).install(model)
    masks = unpack_masks(stored["masks"], device=device) if stored["masks"] is not None else None
    return PreparedModel(stored["trainable_names"], masks, stored["client_masks"], json.loads(stored["info"]))


def _read_cache(path):
    if path is None or not Path(path).is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable cache entry is recomputed, never trusted
        return None


def _write_cache(path, value) -> None:
    if path is not None:
        atomic_torch_save(value, Path(path))


def validate_spec_for_federation(spec: FineTuneSpec, num_clients: int) -> None:
    """Federated constraints checked before any compute."""
    if spec.is_sparse and spec.mask_scope == "local" and spec.mask_rule in ("lowest_magnitude", "highest_magnitude"):
        raise ConfigError("mask_scope='local' with a magnitude rule gives every client the same mask; "
                          "use mask_scope='global'")
    check_int("num_clients", num_clients, minimum=1)
