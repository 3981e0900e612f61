"""FedAvg (McMahan et al., AISTATS 2017) and FedAvgM (Hsu et al., 2019), simulated sequentially.

Round t: sample m = max(1, round(C*K)) distinct clients from the stream
(seed, t); each starts from the global weights w_t, runs J local steps of
SGD with momentum (a fresh optimizer, batches of B from its own shard,
reshuffled whenever the shard is exhausted); the server sets

    w_{t+1} = w_t + eta_s * v_{t+1},   v_{t+1} = beta * v_t + sum_k (n_k / n) (w_k - w_t)

with beta = 0 for plain FedAvg and eta_s = 1 by default. J counts optimizer
steps, never epochs.

Sequential simulation computes exactly what parallel clients would: one model
lives on the device, w_t is copied into it in place for each client, and the
client's delta is folded into running sums as soon as it finishes (no
per-client copies, no stack of client models). Only the trainable entries
are kept as a flat vector; frozen parameters never change.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import models
from .checks import ConfigError, check_bool, check_choice, check_float, check_int
from .data import DataBundle, augmentation_generator
from .drift import DeltaStats
from .optim import SparseSGDM
from .precision import PRECISIONS, grad_scaler, resolve_precision
from .runs import Checkpoint
from .schedules import lr_multiplier
from .seeding import numpy_rng
from .sharding import SHARDINGS, make_shards
from .sparse import (FineTuneSpec, PreparedModel, head_cache_path, prepare_federated,
                     validate_spec_for_federation)
from .training import (RunResult, _check_data_matches, _evaluate_splits, _summary, read_complete, train_steps,
                       training_batches)
from .workspace import Workspace

CLIENT_LR_SCHEDULES = ("constant", "cosine")
BYTES_PER_ENTRY = 4  # float32 on the wire


@dataclass(frozen=True)
class FedAvgConfig:
    """Everything that determines a FedAvg run's numbers (its identity)."""

    dataset: str = "cifar100"
    model: str = "dino_vits16"
    seed: int = 0
    num_clients: int = 100           # K
    participation: float = 0.1       # C: max(1, round(C*K)) clients per round
    local_steps: int = 4             # J: optimizer steps per client per round (not epochs)
    rounds: int = 300                # communication rounds
    batch_size: int = 32             # B: images per local step (capped at the client's shard size)
    lr: float = 0.01                 # client learning rate
    momentum: float = 0.9            # client SGD momentum (fresh state every round)
    weight_decay: float = 5e-5
    lr_schedule: str = "constant"    # client lr over rounds: 'constant' | 'cosine'
    server_lr: float = 1.0           # eta_s; 1.0 = plain FedAvg
    server_momentum: float = 0.0     # beta; > 0 = FedAvgM
    sharding: str = "iid"            # 'iid' | 'non_iid' | 'dirichlet'
    classes_per_client: int | None = None   # Nc for sharding='non_iid'
    dirichlet_alpha: float | None = None    # alpha for sharding='dirichlet'
    augment: bool = True             # random crop + flip on client batches
    precision: str = "auto"
    eval_every: int = 10             # rounds between evaluations (and always the last round)
    evaluate_test: bool = True
    finetune: FineTuneSpec = field(default_factory=FineTuneSpec)

    def __post_init__(self):
        check_choice("dataset", self.dataset, ("cifar100", "synthetic"))
        check_choice("model", self.model, models.MODELS)
        check_int("seed", self.seed, minimum=0)
        check_int("num_clients", self.num_clients, minimum=1)
        check_float("participation", self.participation, 0.0, 1.0, low_open=True)
        check_int("local_steps", self.local_steps, minimum=1)
        check_int("rounds", self.rounds, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_float("lr", self.lr, 0.0, None, low_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_float("weight_decay", self.weight_decay, 0.0, None)
        check_choice("lr_schedule", self.lr_schedule, CLIENT_LR_SCHEDULES)
        check_float("server_lr", self.server_lr, 0.0, None, low_open=True)
        check_float("server_momentum", self.server_momentum, 0.0, 1.0, high_open=True)
        check_choice("sharding", self.sharding, SHARDINGS)
        if self.sharding == "non_iid":
            check_int("classes_per_client", self.classes_per_client, minimum=1)
        if self.sharding == "dirichlet":
            check_float("dirichlet_alpha", self.dirichlet_alpha, 0.0, None, low_open=True)
        check_bool("augment", self.augment)
        check_choice("precision", self.precision, PRECISIONS)
        check_int("eval_every", self.eval_every, minimum=1)
        check_bool("evaluate_test", self.evaluate_test)
        if not isinstance(self.finetune, FineTuneSpec):
            raise ConfigError(f"finetune must be a FineTuneSpec, got {type(self.finetune).__name__}")
        validate_spec_for_federation(self.finetune, self.num_clients)

    @property
    def clients_per_round(self) -> int:
        return clients_per_round(self.num_clients, self.participation)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["finetune"] = self.finetune.identity()
        if self.sharding != "non_iid":
            values.pop("classes_per_client")
        if self.sharding != "dirichlet":
            values.pop("dirichlet_alpha")
        return values

    def sharding_name(self) -> str:
        if self.sharding == "non_iid":
            return f"nc{self.classes_per_client}"
        if self.sharding == "dirichlet":
            return f"dir{self.dirichlet_alpha:g}"
        return "iid"

    def run_name(self) -> str:
        return (f"{self.sharding_name()}-J{self.local_steps}-T{self.rounds}{self.finetune.short_name()}"
                f"-s{self.seed}")


def clients_per_round(num_clients: int, participation: float) -> int:
    """m = max(1, round(C * K)) (McMahan et al., 2017)."""
    return max(1, int(round(participation * num_clients)))


def sample_clients(seed: int, round_index: int, num_clients: int, participation: float) -> np.ndarray:
    """The distinct clients of round `round_index`, from the stream (seed, round) alone.

    Neither J nor the algorithm enters the stream, so runs that share a seed
    see the same clients in every round (paired comparisons), and a resumed
    run continues the same sequence.
    """
    m = clients_per_round(num_clients, participation)
    return np.sort(numpy_rng(seed, "clients", round_index).choice(num_clients, size=m, replace=False))


def client_batch_indices(shard: np.ndarray, local_steps: int, batch_size: int, seed: int,
                         round_index: int, client: int) -> np.ndarray:
    """[J, B'] positions for one client's round, B' = min(B, shard size).

    Walks through fresh permutations of the shard from the stream
    (seed, round, client), starting a new one whenever the shard runs out.
    """
    batch = min(batch_size, len(shard))
    needed = local_steps * batch
    rng = numpy_rng(seed, "client-batches", round_index, client)
    passes = -(-needed // len(shard))
    order = np.concatenate([rng.permutation(shard) for _ in range(passes)])[:needed]
    return order.reshape(local_steps, batch)


@torch.no_grad()
def server_step(global_weights: torch.Tensor, average_delta: torch.Tensor, velocity: torch.Tensor | None,
                server_lr: float, server_momentum: float) -> None:
    """In place: v <- beta v + avg_delta (if FedAvgM), w <- w + eta_s * (v or avg_delta)."""
    step = average_delta
    if velocity is not None:
        velocity.mul_(server_momentum).add_(average_delta)
        step = velocity
    global_weights.add_(step, alpha=server_lr)


# --------------------------------------------------------------------------- flat views

class FlatParameters:
    """The trainable parameters of a model as one flat vector (views share storage)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        params = dict(model.named_parameters())
        self.names = names
        self.params = [params[n] for n in names]
        self.size = sum(p.numel() for p in self.params)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def read(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def load(self, flat: torch.Tensor) -> None:
        torch._foreach_copy_(self.params, self.views(flat))

    def mask_vector(self, masks: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        if masks is None:
            return None
        return torch.cat([(masks[n] if n in masks else torch.ones_like(p, dtype=torch.bool)).reshape(-1)
                          for n, p in zip(self.names, self.params)])


# --------------------------------------------------------------------------- the run

def run_fedavg(ws: Workspace, data: DataBundle, config: FedAvgConfig, *, experiment: str = "fedavg",
               eval_batch_size: int = 256, checkpoint_every: int = 1, save_weights: bool = False,
               progress: bool = True) -> RunResult:
    """Run (or resume, or just read) a FedAvg experiment; returns its summary and metrics."""
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    check_int("checkpoint_every", checkpoint_every, minimum=1)
    _check_data_matches(data, config.dataset)
    shards = make_shards(data.train_labels_numpy(), config.sharding, config.num_clients, config.seed,
                         config.classes_per_client, config.dirichlet_alpha)
    run = ws.run(experiment, config.run_name(), config.to_dict())
    if run.is_complete:
        return read_complete(run)
    with run:
        trainer = _FedAvgTrainer(ws, data, config, run, shards, eval_batch_size)
        return trainer.train(checkpoint_every, save_weights, progress)


def run_head_only(ws: Workspace, data: DataBundle, config: FedAvgConfig, *, experiment: str = "head_only",
                  eval_batch_size: int = 256) -> RunResult:
    """Step 0 alone: the frozen head fitted from client statistics, evaluated with no fine-tuning.

    Uses the same preparation as a FedAvg run of this config (same shards,
    same federated head), so it is the "round 0" of the sparse runs.
    """
    if config.finetune.head == "train":
        raise ConfigError("run_head_only needs a fitted head: finetune.head must be 'ridge' or 'probe'")
    check_int("eval_batch_size", eval_batch_size, minimum=1)
    _check_data_matches(data, config.dataset)
    shards = make_shards(data.train_labels_numpy(), config.sharding, config.num_clients, config.seed,
                         config.classes_per_client, config.dirichlet_alpha)
    identity = {k: v for k, v in config.to_dict().items() if k not in ("rounds", "local_steps", "lr_schedule")}
    name = f"{config.sharding_name()}-{config.finetune.head}-s{config.seed}"
    run = ws.run(experiment, name, identity)
    if run.is_complete:
        return read_complete(run)
    with run:
        started = time.perf_counter()
        trainer = _FedAvgTrainer(ws, data, config, run, shards, eval_batch_size)
        row = {"round": 0, **_evaluate_splits(trainer.model, data, trainer.img_size, eval_batch_size,
                                               trainer.precision, config.evaluate_test)}
        timing = [{"round": 0, "wall_s": time.perf_counter() - started}]
        summary = {**_summary([row], timing, trainer.precision, trainer.device), **trainer.prepared.info}
        run.finish(summary, [row], timing)
    return RunResult(run, summary, run.metrics())


class _FedAvgTrainer:
    """The state of one FedAvg run between rounds, and one round's work."""

    def __init__(self, ws, data, config, run, shards, eval_batch_size):
        self.data, self.config, self.run, self.shards = data, config, run, shards
        self.eval_batch_size = eval_batch_size
        self.device = data.device
        self.precision = resolve_precision(config.precision, self.device)
        self.img_size = models.input_size(config.model)
        self.model = ws.build_model(config.model, data.num_classes, head_seed=config.seed).to(self.device)
        self.prepared: PreparedModel = prepare_federated(
            run, self.model, data, config.finetune, config.seed, self.img_size, self.precision, shards,
            config.clients_per_round,
            head_cache=head_cache_path(ws.root, config.finetune, model=config.model, weights=ws.weights_path,
                                       dataset=config.dataset, sharding=config.sharding_name(),
                                       num_clients=config.num_clients, participation=config.participation,
                                       seed=config.seed))
        self.flat = FlatParameters(self.model, self.prepared.trainable_names)
        self.global_weights = self.flat.read()
        self.server_velocity = torch.zeros_like(self.global_weights) if config.server_momentum > 0 else None
        self.shard_sizes = np.array([len(s) for s in shards])
        self.global_mask = self.flat.mask_vector(self.prepared.masks)
        self._upload_sizes: dict = {}
        self.trainable_entries = self._count_trainable_entries()

    # ------------------------------------------------------------------ loop
    def train(self, checkpoint_every: int, save_weights: bool, progress: bool) -> RunResult:
        config, rows, timing, start = self.config, [], [], 0
        checkpoint = self.run.load_checkpoint(map_location=self.device)
        if checkpoint is not None:
            self._load_state(checkpoint.state)
            rows, timing, start = checkpoint.rows, checkpoint.timing, checkpoint.step
        elapsed = timing[-1]["wall_s"] if timing else 0.0
        bar = tqdm(range(start, config.rounds), desc=f"FedAvg {self.run.dir.name}", initial=start,
                   total=config.rounds, disable=not progress)
        for round_index in bar:
            row, times = self.round(round_index)
            elapsed += sum(times.values())
            rows.append(row)
            timing.append({"round": round_index + 1, **times, "wall_s": elapsed})
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_acc") if k in row})
            if (round_index + 1) % checkpoint_every == 0 or round_index + 1 == config.rounds:
                self.run.save_checkpoint(Checkpoint(round_index + 1, self._state(), rows, timing))
        summary = _summary([r for r in rows if "val_acc" in r], timing, self.precision, self.device)
        summary.update(self.prepared.info)
        summary["trainable_entries"] = self.trainable_entries
        self.flat.load(self.global_weights)
        if save_weights:
            self.run.save_artifact("model.pt", {k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        self.run.finish(summary, rows, timing)
        return RunResult(self.run, summary, self.run.metrics())

    def round(self, round_index: int) -> tuple[dict, dict]:
        """One communication round; returns its metrics row and its phase timings (s)."""
        config = self.config
        lr = config.lr * (lr_multiplier("cosine", round_index, config.rounds)
                          if config.lr_schedule == "cosine" else 1.0)
        clients = sample_clients(config.seed, round_index, config.num_clients, config.participation)
        stats = DeltaStats(self.flat.size, self.device)
        times = {"local_train_s": 0.0, "server_s": 0.0, "eval_s": 0.0}
        loss_sum, samples, bytes_up = 0.0, 0, 0
        for client in clients:
            started = time.perf_counter()
            self.flat.load(self.global_weights)
            loaded = time.perf_counter()
            client_loss, count, masks = self._local_training(round_index, int(client), lr)
            trained = time.perf_counter()
            delta = self.flat.read().sub_(self.global_weights)
            stats.add(delta, weight=float(self.shard_sizes[client]))
            loss_sum += client_loss
            samples += count
            bytes_up += BYTES_PER_ENTRY * self._entries_sent(int(client), masks)
            times["local_train_s"] += trained - loaded
            times["server_s"] += (loaded - started) + (time.perf_counter() - trained)
        started = time.perf_counter()
        self._server_update(stats)
        row = {"round": round_index + 1, "clients": " ".join(str(int(c)) for c in clients),
               "lr": lr, "train_loss": loss_sum / samples,
               **stats.summary(), "bytes_down": len(clients) * BYTES_PER_ENTRY * self.trainable_entries,
               "bytes_up": bytes_up}
        times["server_s"] += time.perf_counter() - started
        if (round_index + 1) % config.eval_every == 0 or round_index + 1 == config.rounds:
            started = time.perf_counter()
            self.flat.load(self.global_weights)
            row.update(_evaluate_splits(self.model, self.data, self.img_size, self.eval_batch_size,
                                        self.precision, config.evaluate_test))
            times["eval_s"] = time.perf_counter() - started
        return row, times

    def _local_training(self, round_index: int, client: int, lr: float):
        config = self.config
        masks = self.prepared.masks_for_client(client, self.device)
        params = self.flat.params
        optimizer = SparseSGDM(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               masks=[masks.get(n) for n in self.flat.names] if masks else None)
        scaler = grad_scaler(self.device, self.precision)
        positions = client_batch_indices(self.shards[client], config.local_steps, config.batch_size,
                                         config.seed, round_index, client)
        batch_indices = list(torch.from_numpy(positions).to(self.device))
        generator = (augmentation_generator(config.seed, "round", round_index, "client", client, device=self.device)
                     if config.augment else None)
        loss_sum, count = train_steps(self.model, optimizer, scaler,
                                      training_batches(self.data.train, self.img_size, batch_indices, generator),
                                      self.precision)
        return loss_sum.item(), count, masks

    @torch.no_grad()
    def _server_update(self, stats: DeltaStats) -> None:
        server_step(self.global_weights, stats.average_delta(), self.server_velocity,
                    self.config.server_lr, self.config.server_momentum)

    # ------------------------------------------------------------------ accounting
    def _count_trainable_entries(self) -> int:
        """Entries that can differ from the pre-trained model (what a client must download)."""
        if self.global_mask is not None:
            return int(self.global_mask.sum())
        return self.flat.size  # dense, or local masks whose union can cover everything

    def _entries_sent(self, client: int, masks) -> int:
        """Entries a client uploads: with a mask only its trainable entries travel (the server knows the mask).

        Counted once per client (masks never change during a run), not every round.
        """
        if masks is None:
            return self.flat.size
        key = client if self.prepared.client_masks else "global"
        if key not in self._upload_sizes:
            self._upload_sizes[key] = int(sum(int(masks[n].sum()) if n in masks else p.numel()
                                              for n, p in zip(self.flat.names, self.flat.params)))
        return self._upload_sizes[key]

    # ------------------------------------------------------------------ checkpoint
    def _state(self) -> dict:
        return {"global_weights": self.global_weights, "server_velocity": self.server_velocity}

    def _load_state(self, state: dict) -> None:
        self.global_weights = state["global_weights"].to(self.device)
        velocity = state["server_velocity"]
        self.server_velocity = velocity.to(self.device) if velocity is not None else None
