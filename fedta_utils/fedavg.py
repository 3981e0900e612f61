"""FedAvg (McMahan et al., AISTATS 2017) and FedAvgM (Hsu et al., 2019), simulated sequentially.

Round t: sample m = max(1, round(C*K)) distinct clients from the stream (seed, t); each starts
from the global weights w_t and runs J local steps of SGD with momentum (a fresh optimizer,
batches of B from its own shard, reshuffled whenever the shard is exhausted): `client_update`.
The server then sets (`server_update`)

    w_{t+1} = w_t + eta_s * v_{t+1},   v_{t+1} = beta * v_t + sum_k (n_k / n) (w_k - w_t)

with beta = 0 for plain FedAvg and eta_s = 1 by default. J counts optimizer steps, never epochs; a
step the fp16 loss scaler skips still uses its batch (logged per round as `skipped_steps`). Under
fp16 every client starts from the run's loss-scaler state, which then takes the smallest scale
its clients ended with (`merge_scaler_states`).

Sequential simulation computes exactly what parallel clients would: one model lives on the
device, w_t is loaded into it for each client, and each delta is folded into a running sum as
soon as the client finishes (no per-client copies). Only the trainable parameters travel, as one
flat vector. The drift and interference statistics (`DeltaStats`) are computed from the same
deltas, beside the algorithm, not inside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import models
from .checks import check_bool, check_choice, check_float, check_int
from .data import DataBundle, augmentation_generator, numpy_rng
from .finetune import FineTuneSpec, head_cache_path, prepare
from .optim import lr_multiplier
from .runs import Checkpoint, CheckpointSchedule
from .sharding import SHARDINGS, make_shards
from .training import (
    RunResult,
    check_run_fields,
    checked_run,
    eval_steps,
    evaluate_splits,
    load_flat,
    make_optimizer,
    moving_entries,
    read_complete,
    read_flat,
    summarize,
    train_steps,
    training_batches,
)

CLIENT_LR_SCHEDULES = ("constant", "cosine")
BYTES_PER_ENTRY = 4  # float32 on the wire


@dataclass(frozen=True)
class FedAvgConfig:
    """Everything that determines a FedAvg run's numbers (its identity)."""

    dataset: str = "cifar100"
    model: str = "dino_vits16"
    img_size: int | None = None  # input pixels, a multiple of the patch size; None = the model's native
    seed: int = 0
    num_clients: int = 100  # K
    participation: float = 0.1  # C: max(1, round(C*K)) clients per round
    local_steps: int = 4  # J: optimizer steps per client per round (not epochs)
    rounds: int = 300  # communication rounds
    batch_size: int = 32  # B: images per local step (capped at the client's shard size)
    lr: float = 0.01  # client learning rate
    momentum: float = 0.9  # client SGD momentum (fresh state every round)
    weight_decay: float = 5e-5
    lr_schedule: str = "constant"  # client lr over rounds: 'constant' | 'cosine'
    server_lr: float = 1.0  # eta_s; 1.0 = plain FedAvg
    server_momentum: float = 0.0  # beta; > 0 = FedAvgM
    sharding: str = "iid"  # 'iid' | 'non_iid' | 'dirichlet'
    classes_per_client: int | None = None  # Nc for sharding='non_iid'
    dirichlet_alpha: float | None = None  # alpha for sharding='dirichlet'
    augment: bool = True  # random crop + flip on client batches
    precision: str = "auto"
    eval_points: int = 10  # evaluations, evenly spaced over the rounds (the last round always)
    eval_subset: int = 1000  # images per split evaluated before the last round (training.eval_steps)
    evaluate_test: bool = True
    finetune: FineTuneSpec = field(default_factory=FineTuneSpec)

    def __post_init__(self):
        check_run_fields(self, ("num_clients", "local_steps", "rounds"))
        check_float("participation", self.participation, 0.0, 1.0, low_open=True)
        check_choice("lr_schedule", self.lr_schedule, CLIENT_LR_SCHEDULES)
        check_float("server_lr", self.server_lr, 0.0, None, low_open=True)
        check_float("server_momentum", self.server_momentum, 0.0, 1.0, high_open=True)
        check_choice("sharding", self.sharding, SHARDINGS)
        if self.sharding == "non_iid":
            check_int("classes_per_client", self.classes_per_client, minimum=1)
        if self.sharding == "dirichlet":
            check_float("dirichlet_alpha", self.dirichlet_alpha, 0.0, None, low_open=True)
        check_bool("augment", self.augment)

    @property
    def clients_per_round(self) -> int:
        return clients_per_round(self.num_clients, self.participation)

    def to_dict(self) -> dict:
        """The identity: the resolved img_size, so None and the native size name the same run."""
        values = {
            **asdict(self),
            "img_size": models.input_size(self.model, self.img_size),
            "finetune": self.finetune.identity(),
        }
        if self.sharding != "non_iid":
            values.pop("classes_per_client")
        if self.sharding != "dirichlet":
            values.pop("dirichlet_alpha")
        return values

    def sharding_name(self) -> str:
        if self.sharding == "non_iid":
            return f"nc{self.classes_per_client}"
        return f"dir{self.dirichlet_alpha:g}" if self.sharding == "dirichlet" else "iid"

    def run_name(self) -> str:
        name = f"{self.sharding_name()}-J{self.local_steps}-T{self.rounds}"
        return f"{name}{self.finetune.short_name()}-s{self.seed}"

    def shards(self, data: DataBundle) -> list[np.ndarray]:
        return make_shards(
            data.train_labels_numpy(),
            self.sharding,
            self.num_clients,
            self.seed,
            self.classes_per_client,
            self.dirichlet_alpha,
        )

    def head_cache(self, ws):
        """Where this config's step-0 head is shared with every run that has the same shards."""
        return head_cache_path(
            ws.root,
            self.finetune,
            model=self.model,
            weights=ws.weights_path,
            dataset=self.dataset,
            sharding=self.sharding_name(),
            num_clients=self.num_clients,
            seed=self.seed,
            img_size=models.input_size(self.model, self.img_size),
            precision=models.resolve_precision(self.precision, ws.device),
        )


def clients_per_round(num_clients: int, participation: float) -> int:
    """m = max(1, round(C * K)) (McMahan et al., 2017)."""
    return max(1, int(round(participation * num_clients)))


def sample_clients(seed: int, round_index: int, num_clients: int, participation: float) -> np.ndarray:
    """The distinct clients of round `round_index`, from the stream (seed, round) alone.

    Neither J nor the algorithm enters the stream, so runs that share a seed see the same clients
    in every round (paired comparisons), and a resumed run continues the same sequence.
    """
    m = clients_per_round(num_clients, participation)
    return np.sort(numpy_rng(seed, "clients", round_index).choice(num_clients, size=m, replace=False))


def client_batch_indices(
    shard: np.ndarray, local_steps: int, batch_size: int, seed: int, round_index: int, client: int
) -> np.ndarray:
    """[J, B'] positions for one client's round, B' = min(B, shard size).

    Walks through fresh permutations of the shard from the stream (seed, round, client),
    starting a new one whenever the shard runs out.
    """
    batch = min(batch_size, len(shard))
    needed = local_steps * batch
    rng = numpy_rng(seed, "client-batches", round_index, client)
    order = np.concatenate([rng.permutation(shard) for _ in range(-(-needed // len(shard)))])
    return order[:needed].reshape(local_steps, batch)


# --------------------------------------------------------------------------- the algorithm


def client_update(model, params, global_weights, batches, optimizer, precision, scaler_state=None) -> tuple:
    """One client's local training from w_t and the round's loss-scaler state (None: a fresh scaler).

    Returns (delta w_k - w_t, samples seen, summed loss, skipped steps, the scaler's end state).
    `params` are the model's trainable parameters (the flat layout of `global_weights`),
    `batches` the client's J lazily built (inputs, labels) pairs, `optimizer` a fresh one.
    """
    load_flat(params, global_weights)
    scaler = models.grad_scaler(global_weights.device, precision)
    if scaler_state:  # a disabled scaler (bf16, fp32) has the empty state and ignores any
        scaler.load_state_dict(scaler_state)
    loss_sum, count, skipped = train_steps(model, optimizer, scaler, batches, precision)
    return read_flat(params).sub_(global_weights), count, loss_sum.item(), skipped, scaler.state_dict()


def merge_scaler_states(states: list[dict]) -> dict:
    """The run's fp16 loss-scaler state after a round, from its clients' end states.

    Every client of a round starts from the run's state, so clients stay independent (sequential
    simulation equals parallel clients), yet the scale carries over between rounds instead of
    restarting at 2^16 for every client. The run keeps the smallest end scale (the most cautious:
    it backed off for the worst client) and the smallest growth tracker (clean steps since the last
    overflow), so the scale still doubles after growth_interval clean steps on every client.
    """
    if not states[0]:
        return {}  # disabled scalers (bf16, fp32) have no state
    return {
        **states[0],
        "scale": min(s["scale"] for s in states),
        "_growth_tracker": min(s["_growth_tracker"] for s in states),
    }


@torch.no_grad()
def server_update(global_weights, delta_sum, weight_sum, velocity, server_lr, server_momentum) -> None:
    """In place: avg = delta_sum / weight_sum; v <- beta v + avg (FedAvgM); w <- w + eta_s * (v or avg)."""
    step = delta_sum / weight_sum
    if velocity is not None:
        step = velocity.mul_(server_momentum).add_(step)
    global_weights.add_(step, alpha=server_lr)


class DeltaStats:
    """Drift and interference of one round's client deltas, accumulated as clients finish.

        mean_client_delta_norm   mean_k ||d_k||
        avg_delta_norm           || sum_k (n_k / n) d_k ||   (the server's step before eta_s)
        mean_pairwise_cosine     mean over k != l of cos(d_k, d_l)
        sign_conflict_fraction   among entries some client moved, the share moved both ways
        sign_agreement           among moved entries, mean |sum_k sign(d_k)| / movers: 1 when all
                                 movers agree, about 1/sqrt(m) for random signs (the graded
                                 version: with 10 dense clients nearly every entry has a conflict)

    No delta is kept: with u_k = d_k / ||d_k||, sum_{k != l} <u_k, u_l> = ||sum_k u_k||^2 - m, so
    a running sum of unit vectors gives the mean pairwise cosine exactly; two bool vectors give
    the conflicts; a running sum of signs and a count of movers give the agreement.
    """

    def __init__(self, size: int, device):
        self.unit_sum = torch.zeros(size, device=device)
        self.sign_sum = torch.zeros(size, device=device)
        self.movers = torch.zeros(size, device=device)
        self.moved_up = torch.zeros(size, device=device, dtype=torch.bool)
        self.moved_down = torch.zeros(size, device=device, dtype=torch.bool)
        self.norms = []

    def add(self, delta: torch.Tensor) -> None:
        norm = torch.linalg.vector_norm(delta)
        self.unit_sum.add_(delta / norm.clamp_min(torch.finfo(delta.dtype).tiny))
        signs = torch.sign(delta)
        self.sign_sum.add_(signs)
        self.movers.add_(signs.abs())
        self.moved_up |= delta > 0
        self.moved_down |= delta < 0
        self.norms.append(norm)

    def summary(self, average_delta: torch.Tensor) -> dict[str, float]:
        """The five statistics as floats (one host sync per round)."""
        m = len(self.norms)
        moved = (self.moved_up | self.moved_down).sum().float()
        values = torch.stack(
            [
                torch.stack(self.norms).mean(),
                torch.linalg.vector_norm(average_delta),
                self.unit_sum.square().sum(),
                moved,
                (self.moved_up & self.moved_down).sum(),
                (self.sign_sum.abs() / self.movers.clamp_min(1)).sum(),
            ]
        ).tolist()
        mean_norm, avg_norm, unit_sq, moved, conflicts, agreement = values
        return {
            "mean_client_delta_norm": mean_norm,
            "avg_delta_norm": avg_norm,
            "mean_pairwise_cosine": (unit_sq - m) / (m * (m - 1)) if m > 1 else math.nan,
            "sign_conflict_fraction": conflicts / moved if moved else 0.0,
            "sign_agreement": agreement / moved if moved else 1.0,
        }


# --------------------------------------------------------------------------- the run


def run_fedavg(
    ws,
    data: DataBundle,
    config: FedAvgConfig,
    *,
    eval_batch_size: int = 256,
    checkpoint_every: int | None = None,
    checkpoint_minutes: float = 15,
    save_weights: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run (or resume, or just read back) a FedAvg experiment; returns its summary and metrics.

    Checkpoints: every `checkpoint_every` rounds, or with None after `checkpoint_minutes` of wall time
    (runs.CheckpointSchedule)."""
    run = checked_run(ws, data, config, eval_batch_size, checkpoint_every, checkpoint_minutes)
    shards = config.shards(data)  # impossible requests fail here, before the run folder exists
    if run.is_complete:
        return read_complete(run)
    with run:
        if run.is_complete:  # finished by another process between the check above and taking its lock
            return read_complete(run)
        schedule = CheckpointSchedule(checkpoint_every, checkpoint_minutes)
        return FedAvgRun(ws, data, config, run, shards, eval_batch_size).train(
            schedule, save_weights, progress
        )


class FedAvgRun:
    """One FedAvg run's state between rounds: the model, w_t, the server velocity, the mask."""

    def __init__(self, ws, data, config, run, shards, eval_batch_size):
        self.data, self.config, self.run, self.shards = data, config, run, shards
        self.eval_batch_size, self.device = eval_batch_size, data.device
        self.precision = models.resolve_precision(config.precision, self.device)
        self.img_size = models.input_size(config.model, config.img_size)
        self.model = ws.build_model(config.model, data.num_classes, config.seed, self.img_size)
        self.model.to(self.device)
        self.prepared = prepare(
            run,
            self.model,
            data,
            config.finetune,
            config.seed,
            self.img_size,
            self.precision,
            shards,
            config.head_cache(ws),
        )
        named = dict(self.model.named_parameters())
        self.params = [named[n] for n in self.prepared.trainable_names]
        self.global_weights = read_flat(self.params)
        self.velocity = torch.zeros_like(self.global_weights) if config.server_momentum > 0 else None
        self.scaler_state = models.grad_scaler(self.device, self.precision).state_dict()
        # With a global mask only its trainable entries change and travel (the server knows the mask), and
        # only they are checkpointed: the others stay at the values every resume starts from.
        moving = moving_entries(self.prepared.trainable_names, self.params, self.prepared.masks)
        self.entries = slice(None) if moving is None else moving  # indexes the flat vectors
        self.entries_sent = len(self.global_weights[self.entries])

    def state(self) -> dict:
        """What a resume needs: w_t and the server velocity (their changing entries), the scaler state."""
        velocity = None if self.velocity is None else self.velocity[self.entries]
        return {
            "global_weights": self.global_weights[self.entries],
            "server_velocity": velocity,
            "grad_scaler": self.scaler_state,
        }

    def restore(self, state: dict) -> None:
        self.global_weights[self.entries] = state["global_weights"].to(self.device)
        if self.velocity is not None:
            self.velocity[self.entries] = state["server_velocity"].to(self.device)
        # {} from a run that started without fp16 keeps the fresh state
        self.scaler_state = state["grad_scaler"] or self.scaler_state

    def train(self, schedule: CheckpointSchedule, save_weights: bool, progress: bool) -> RunResult:
        config, rows, timing, start = self.config, [], [], 0
        checkpoint = self.run.load_checkpoint(map_location=self.device)
        if checkpoint is not None:
            self.restore(checkpoint.state)
            rows, timing, start = checkpoint.rows, checkpoint.timing, checkpoint.step
        elapsed = timing[-1]["wall_s"] if timing else 0.0
        bar = tqdm(
            range(start, config.rounds),
            desc=f"FedAvg {self.run.dir.name}",
            initial=start,
            total=config.rounds,
            disable=not progress,
        )
        for round_index in bar:
            row, times = self.round(round_index)
            elapsed += sum(times.values())
            rows.append(row)
            timing.append({"round": round_index + 1, **times, "wall_s": elapsed})
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "val_acc") if k in row})
            done = round_index + 1
            if done < config.rounds and schedule.due(done):
                self.run.save_checkpoint(Checkpoint(done, self.state(), rows, timing))
        summary = {
            **summarize(rows, timing, self.precision, self.device),
            **self.prepared.info,
            "trainable_entries": self.entries_sent,
        }
        load_flat(self.params, self.global_weights)
        if save_weights:
            weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            self.run.save_artifact("model.pt", weights)
        self.run.finish(summary, rows, timing)
        return RunResult(self.run, summary, self.run.metrics())

    def round(self, round_index: int) -> tuple[dict, dict]:
        """One communication round; returns its metrics row and its phase timings (s)."""
        config, started = self.config, time.perf_counter()
        lr = config.lr * (
            lr_multiplier("cosine", round_index, config.rounds) if config.lr_schedule == "cosine" else 1.0
        )
        clients = sample_clients(config.seed, round_index, config.num_clients, config.participation)
        stats = DeltaStats(len(self.global_weights), self.device)
        delta_sum, weight_sum, loss_sum, samples = torch.zeros_like(self.global_weights), 0, 0.0, 0
        skipped, end_states = 0, []
        for client in clients:
            delta, count, loss, skips, end_state = client_update(
                self.model,
                self.params,
                self.global_weights,
                self.client_batches(round_index, int(client)),
                self.client_optimizer(lr),
                self.precision,
                self.scaler_state,
            )
            n_k = len(self.shards[client])  # FedAvg weighs by the client's data size
            delta_sum.add_(delta, alpha=n_k)
            weight_sum += n_k
            stats.add(delta)
            loss_sum, samples = loss_sum + loss, samples + count
            skipped, end_states = skipped + skips, end_states + [end_state]
        self.scaler_state = merge_scaler_states(end_states)
        server_update(
            self.global_weights,
            delta_sum,
            weight_sum,
            self.velocity,
            config.server_lr,
            config.server_momentum,
        )
        row = {
            "round": round_index + 1,
            "clients": " ".join(str(int(c)) for c in clients),
            "lr": lr,
            "train_loss": loss_sum / samples,
            **stats.summary(delta_sum / weight_sum),
            "skipped_steps": skipped,
            "bytes_down": len(clients) * BYTES_PER_ENTRY * self.entries_sent,
            "bytes_up": len(clients) * BYTES_PER_ENTRY * self.entries_sent,
        }
        times = {"train_s": time.perf_counter() - started, "eval_s": 0.0}
        if round_index + 1 in eval_steps(config.rounds, config.eval_points):
            started = time.perf_counter()
            load_flat(self.params, self.global_weights)
            row.update(
                evaluate_splits(
                    self.model,
                    self.data,
                    self.img_size,
                    self.eval_batch_size,
                    self.precision,
                    config.evaluate_test,
                    None if round_index + 1 == config.rounds else config.eval_subset,
                )
            )
            times["eval_s"] = time.perf_counter() - started
        return row, times

    def client_batches(self, round_index: int, client: int):
        """The client's J augmented batches, from its own seed stream (seed, round, client)."""
        config = self.config
        positions = client_batch_indices(
            self.shards[client], config.local_steps, config.batch_size, config.seed, round_index, client
        )
        generator = (
            augmentation_generator(config.seed, "round", round_index, "client", client, device=self.device)
            if config.augment
            else None
        )
        return training_batches(
            self.data.train, self.img_size, torch.from_numpy(positions).to(self.device), generator
        )

    def client_optimizer(self, lr: float):
        config = self.config
        return make_optimizer(
            self.params,
            self.prepared.trainable_names,
            self.prepared.masks,
            lr,
            config.momentum,
            config.weight_decay,
            config.finetune.max_grad_norm,
        )
