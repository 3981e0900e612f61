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
from dataclasses import dataclass, field

import numpy as np
import torch

from . import models
from .aggregation import MERGE_RULES, make_merge
from .checks import ConfigError, check_bool, check_choice, check_float, check_int
from .data import DataBundle, augmentation_generator, make_batch, numpy_rng, torch_generator
from .fisher import fisher_sums
from .optim import lr_multiplier
from .prepare import FineTuneSpec, run_head_cache
from .runs import Run
from .sharding import SHARDINGS, make_shards
from .training import (
    RunResult,
    TrainingRun,
    check_run_fields,
    clip_count,
    eval_steps,
    identity,
    load_flat,
    moving_entries,
    read_flat,
    run_folder,
    train_or_read,
    train_steps,
    training_batches,
)

CLIENT_LR_SCHEDULES = ("constant", "cosine")
ALGORITHMS = (
    "fedavg",
    "fedprox",
    "scaffold",
)  # what a client adds to its gradients: nothing, mu (w - w_t), c - c_i
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
    algorithm: str = (
        "fedavg"  # 'fedavg' | 'fedprox' (Li et al., 2020) | 'scaffold' (Karimireddy et al., 2020)
    )
    prox_mu: float = 0.0  # FedProx's mu: clients minimise F_k(w) + mu/2 ||w - w_t||^2
    merge_rule: str = "mean"  # how the server merges the deltas: 'mean' | 'ties' | 'fisher' (aggregation.py)
    ties_density: float = 0.2  # TIES: the fraction of each delta's entries kept (largest magnitudes)
    merge_fisher_samples: int = 32  # Fisher merge: samples per client for its Fisher at its end weights
    sharding: str = "iid"  # 'iid' | 'non_iid' | 'dirichlet'
    classes_per_client: int | None = None  # Nc for sharding='non_iid'
    dirichlet_alpha: float | None = None  # alpha for sharding='dirichlet'
    augment: bool = True  # random crop + flip on client batches
    precision: str = "auto"
    eval_points: int = 10  # evaluations, evenly spaced over the rounds (the last round always)
    eval_subset: int = 1000  # images per split evaluated before the last round (training.eval_steps)
    full_val_curve: bool = False  # True: the full validation split at every evaluation, not its subset
    evaluate_test: bool = True
    finetune: FineTuneSpec = field(default_factory=FineTuneSpec)

    def __post_init__(self):
        check_run_fields(self, ("num_clients", "local_steps", "rounds"))
        check_float("participation", self.participation, 0.0, 1.0, low_open=True)
        check_choice("lr_schedule", self.lr_schedule, CLIENT_LR_SCHEDULES)
        check_float("server_lr", self.server_lr, 0.0, None, low_open=True)
        check_float("server_momentum", self.server_momentum, 0.0, 1.0, high_open=True)
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_float("prox_mu", self.prox_mu, 0.0, None)
        if self.prox_mu > 0 and self.algorithm != "fedprox":
            raise ConfigError(f"prox_mu={self.prox_mu:g} applies to algorithm='fedprox' only")
        check_choice("merge_rule", self.merge_rule, MERGE_RULES)
        check_float("ties_density", self.ties_density, 0.0, 1.0, low_open=True)
        check_int("merge_fisher_samples", self.merge_fisher_samples, minimum=1)
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
        values = identity(self)
        if self.sharding != "non_iid":
            values.pop("classes_per_client")
        if self.sharding != "dirichlet":
            values.pop("dirichlet_alpha")
        # A field that does not apply is left out, so plain FedAvg keeps the identity it had before them.
        unused = {
            "algorithm": self.algorithm == "fedavg",
            "prox_mu": self.algorithm != "fedprox",
            "merge_rule": self.merge_rule == "mean",
            "ties_density": self.merge_rule != "ties",
            "merge_fisher_samples": self.merge_rule != "fisher",
        }
        for name, drop in unused.items():
            if drop:
                values.pop(name)
        return values

    def sharding_name(self) -> str:
        if self.sharding == "non_iid":
            return f"nc{self.classes_per_client}"
        return f"dir{self.dirichlet_alpha:g}" if self.sharding == "dirichlet" else "iid"

    def run_name(self) -> str:
        name = f"{self.sharding_name()}-J{self.local_steps}-T{self.rounds}"
        if self.algorithm != "fedavg":
            name += f"-{self.algorithm}" + (f"{self.prox_mu:g}" if self.algorithm == "fedprox" else "")
        if self.merge_rule != "mean":
            name += f"-{self.merge_rule}"
        return f"{name}{self.finetune.short_name()}-s{self.seed}"

    def shards(self, data: DataBundle) -> list[np.ndarray]:
        return make_shards(
            data.train_labels_numpy(),
            self.sharding,
            self.num_clients,
            self.seed,
            classes_per_client=self.classes_per_client,
            dirichlet_alpha=self.dirichlet_alpha,
        )

    def head_cache(self, ws, device=None):
        """Where this config's step-0 head is shared with every run that has the same shards."""
        return run_head_cache(ws, self, device, sharding=self.sharding_name(), num_clients=self.num_clients)


SCAFFOLD_STATE_LIMIT = 4e9  # bytes of control variates a run may hold on the host (a free Colab has 12 GB)


def check_scaffold_state(entries: int, num_clients: int) -> None:
    """Refuse a SCAFFOLD run whose control variates (float32, the server's and one per client, over the
    entries that train) would not fit SCAFFOLD_STATE_LIMIT: the dense ViT-S/16 needs 100 x 22 M entries,
    8.8 GB; a sparse run (sparsity 0.9) about 0.9 GB."""
    state_bytes = BYTES_PER_ENTRY * entries * (num_clients + 1)
    if state_bytes > SCAFFOLD_STATE_LIMIT:
        raise ConfigError(
            f"algorithm='scaffold' keeps {state_bytes / 1e9:.1f} GB of control variates "
            f"({num_clients} clients x {entries:,} trainable entries, float32), more than "
            f"{SCAFFOLD_STATE_LIMIT / 1e9:g} GB: run it sparse (finetune.mask_rule), where only the "
            "trainable entries have control variates"
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
    shard: np.ndarray, local_steps: int, batch_size: int, seed: int, *, round_index: int, client: int
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


@dataclass
class ClientUpdate:
    """What one client's local training returns to the server, and what the run logs of it."""

    delta: torch.Tensor  # w_k - w_t, flat over the trainable parameters
    samples: int  # images seen in the J steps
    loss_sum: float  # summed per-sample training loss
    steps: int  # J optimizer steps
    skipped_steps: int  # steps the fp16 loss scaler skipped
    clipped_steps: float  # steps whose gradient the clip (finetune.max_grad_norm) scaled down; NaN: no clip
    scaler_state: dict  # the loss scaler's state after the last step ({} when disabled)


def client_update(model, params, global_weights, batches, *, optimizer, precision, scaler_state=None):
    """ClientUpdate(w_k - w_t, ...) of one client's local training from w_t: J optimizer steps (not E
    epochs, as in McMahan et al., 2017, Alg. 1).

    model: the one simulated model; params: its trainable parameters, the flat layout of `global_weights`
    (w_t); batches: the client's J (inputs, labels) pairs, built lazily; optimizer: a fresh one over
    `params`; precision: 'fp32', 'bf16' or 'fp16'; scaler_state: the run's fp16 loss-scaler state that
    every client of a round starts from (None or {}: a fresh scaler).
    """
    load_flat(params, global_weights)
    scaler = models.grad_scaler(global_weights.device, precision)
    if scaler_state:  # a disabled scaler (bf16, fp32) has the empty state and ignores any
        scaler.load_state_dict(scaler_state)
    done = train_steps(model, optimizer, scaler, batches, precision=precision)
    delta = read_flat(params).sub_(global_weights)
    return ClientUpdate(
        delta,
        samples=done.samples,
        loss_sum=done.loss_sum.item(),
        steps=done.steps,
        skipped_steps=done.skipped,
        clipped_steps=clip_count(done),
        scaler_state=scaler.state_dict(),
    )


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
def server_update(global_weights, average_delta, velocity=None, *, server_lr=1.0, server_momentum=0.0):
    """The server's step, in place (FedAvg: McMahan et al., 2017; FedAvgM: Hsu et al., 2019).

        v <- beta * v + average_delta         (FedAvgM; velocity None: plain FedAvg, v = average_delta)
        w <- w + eta_s * v

    global_weights: w_t, flat; average_delta: sum_k (n_k / n) (w_k - w_t); velocity: the server's
    momentum buffer v, updated in place, or None; server_lr: eta_s; server_momentum: beta.
    """
    step = average_delta
    if velocity is not None:
        step = velocity.mul_(server_momentum).add_(average_delta)
    global_weights.add_(step, alpha=server_lr)


class DeltaStats:
    """Drift and interference of one round's client deltas, accumulated as clients finish.

        mean_client_delta_norm   mean_k ||d_k||
        avg_delta_norm           || the merged step ||   (FedAvg: sum_k (n_k / n) d_k; before eta_s)
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


def effective_steps(steps: int, momentum: float) -> float:
    """How many lr * g the `steps` SGD steps of a fresh heavy-ball optimizer move the weights when the
    gradient g stays constant: step j moves lr * g * (1 + beta + ... + beta^(j-1)). J for plain SGD."""
    return sum((1 - momentum**j) / (1 - momentum) for j in range(1, steps + 1))


class ControlVariates:
    """SCAFFOLD's control variates (Karimireddy et al., ICML 2020, Alg. 1 with option II), over the entries
    that train: the server's c and each client's c_i, on the host in float32 (a client's zeros until its
    first round). After client i ran J optimizer steps at lr from w_t to y_i:

        c_i+ = c_i - c + (w_t - y_i) / (S * lr)
        c   <- c + (1/N) * sum over the round's clients of (c_i+ - c_i),   N = all clients, not the round's

    and its steps used the gradient g - c_i + c (SparseSGDM's corrections, added before weight decay and
    momentum). S = J for plain SGD, as in the paper: then (w_t - y_i) / (J * lr) is exactly the mean of
    the J corrected gradients, an estimate that option II's derivation assumes plain SGD at a constant
    lr for. With momentum beta the J steps move S = effective_steps(J, beta) times lr * g for a constant
    g (2.3 J at J = 4, beta = 0.9): J * lr would overestimate the gradient and the variates diverge, while
    (w_t - y_i) / (S * lr) is exactly a weighted mean of the corrected gradients (weights summing to 1).
    With weight decay the estimate includes its pull.
    """

    def __init__(self, size: int, num_clients: int):
        self.server = torch.zeros(size)
        self.clients = {}
        self.num_clients = num_clients
        self.round_change = torch.zeros(size)  # sum over the round's clients of c_i+ - c_i

    def correction(self, client: int) -> torch.Tensor:
        """c - c_i, what client `client` adds to its gradients."""
        return self.server - self.clients.get(client, torch.zeros_like(self.server))

    def client_done(self, client: int, delta: torch.Tensor, steps_lr: float) -> None:
        """c_i+ from the client's delta y_i - w_t and S * lr (S: effective_steps of the steps taken; none:
        c_i stays); c waits for the round's end."""
        if steps_lr == 0:
            return
        old = self.clients.get(client, torch.zeros_like(self.server))
        new = old - self.server - delta.cpu() / steps_lr
        self.round_change += new - old
        self.clients[client] = new

    def round_done(self) -> None:
        self.server += self.round_change / self.num_clients
        self.round_change.zero_()

    def state(self) -> dict:
        return {"server": self.server, "clients": self.clients}

    def restore(self, state: dict) -> None:
        """From state(), back on the host (a checkpoint is loaded onto the run's device)."""
        self.server = state["server"].cpu()
        self.clients = {client: c_i.cpu() for client, c_i in state["clients"].items()}


class RoundLog:
    """What a round logs beside the algorithm: it sees each client's update as the client finishes.

    The training loss over the round's samples, the fp16 steps skipped, the steps clipped, the loss-scaler
    state the run continues with (merge_scaler_states), and the drift and interference statistics
    (DeltaStats).
    """

    def __init__(self, size: int, device):
        self.drift = DeltaStats(size, device)
        self.loss_sum = 0.0
        self.samples = 0
        self.steps = 0
        self.skipped_steps = 0
        self.clipped_steps = 0
        self.scaler_states = []

    def saw(self, update: ClientUpdate) -> None:
        self.drift.add(update.delta)
        self.loss_sum += update.loss_sum
        self.samples += update.samples
        self.steps += update.steps
        self.skipped_steps += update.skipped_steps
        self.clipped_steps += update.clipped_steps
        self.scaler_states.append(update.scaler_state)

    def scaler_state(self) -> dict:
        return merge_scaler_states(self.scaler_states)

    def row(self, average_delta: torch.Tensor) -> dict:
        """samples (trained on), train_loss, the five DeltaStats columns, skipped_steps and clip_fraction
        (the share of the round's steps whose gradient the clip scaled down), in metrics.csv's order."""
        return {
            "samples": self.samples,
            "train_loss": self.loss_sum / self.samples,
            **self.drift.summary(average_delta),
            "skipped_steps": self.skipped_steps,
            "clip_fraction": self.clipped_steps / self.steps,
        }


# --------------------------------------------------------------------------- the run


def run_fedavg(ws, data: DataBundle, config: FedAvgConfig, **options) -> RunResult:
    """Run (or resume, or just read back) a FedAvg experiment; returns its summary and metrics.

    options: eval_batch_size, checkpoint_every, checkpoint_minutes, save_weights, progress
    (training.train_or_read).
    """
    data.check_is(config.dataset)  # the wrong data is named as such, before the shards are drawn from it
    shards = config.shards(data)  # impossible requests fail here, before the run folder exists

    def start_training(run: Run, eval_batch_size: int) -> FedAvgRun:
        return FedAvgRun(ws, data, config, run, shards=shards, eval_batch_size=eval_batch_size)

    return train_or_read(run_folder(ws, config), start_training, **options)


class FedAvgRun(TrainingRun):
    """One FedAvg run's state between rounds: the model, w_t, the server velocity, the loss-scaler state."""

    label = "FedAvg"

    def __init__(self, ws, data, config, run, *, shards, eval_batch_size):
        super().__init__(ws, data, config, run, shards=shards, eval_batch_size=eval_batch_size)
        self.shards = shards
        self.global_weights = read_flat(self.params)
        self.velocity = torch.zeros_like(self.global_weights) if config.server_momentum > 0 else None
        self.scaler_state = models.grad_scaler(self.device, self.precision).state_dict()
        # With a global mask only its trainable entries change and travel (the server knows the mask), and
        # only they are checkpointed: the others stay at the values every resume starts from.
        moving = moving_entries(self.prepared.trainable_names, self.params, self.prepared.masks)
        self.entries = slice(None) if moving is None else moving  # indexes the flat vectors
        self.entries_sent = len(self.global_weights[self.entries])
        self.control = None  # SCAFFOLD's state
        if config.algorithm == "scaffold":
            check_scaffold_state(self.entries_sent, config.num_clients)
            self.control = ControlVariates(self.entries_sent, config.num_clients)
        self.eval_rounds = eval_steps(config.rounds, config.eval_points)

    def state(self) -> dict:
        """What a resume needs: w_t and the server velocity (their changing entries), the scaler state,
        SCAFFOLD's control variates."""
        velocity = None if self.velocity is None else self.velocity[self.entries]
        return {
            "global_weights": self.global_weights[self.entries],
            "server_velocity": velocity,
            "grad_scaler": self.scaler_state,
            "control_variates": None if self.control is None else self.control.state(),
        }

    def restore(self, state: dict) -> None:
        self.global_weights[self.entries] = state["global_weights"].to(self.device)
        if self.velocity is not None:
            self.velocity[self.entries] = state["server_velocity"].to(self.device)
        # {} from a run that started without fp16 keeps the fresh state
        self.scaler_state = state["grad_scaler"] or self.scaler_state
        if self.control is not None:
            self.control.restore(state["control_variates"])

    def units(self) -> int:
        return self.config.rounds

    def train_unit(self, round_index: int) -> None:
        """One round and, at the rounds eval_steps names, an evaluation; logs the row and phase times (s)."""
        started = time.perf_counter()
        row = self.round(round_index)
        times = {"train_s": time.perf_counter() - started, "eval_s": 0.0}
        if round_index + 1 in self.eval_rounds:
            started = time.perf_counter()
            load_flat(self.params, self.global_weights)
            row.update(self.evaluate(last=round_index + 1 == self.config.rounds))
            times["eval_s"] = time.perf_counter() - started
        elapsed = self.timing[-1]["wall_s"] if self.timing else 0.0
        self.rows.append(row)
        self.timing.append({"round": round_index + 1, **times, "wall_s": elapsed + sum(times.values())})

    def round(self, round_index: int) -> dict:
        """One communication round of FedAvg (McMahan et al., 2017, Alg. 1, with J local steps instead of E
        epochs); returns its metrics row."""
        config = self.config
        clients = sample_clients(config.seed, round_index, config.num_clients, config.participation)
        lr = self.client_lr(round_index)
        log = RoundLog(len(self.global_weights), self.device)
        merge = self.new_merge()  # FedAvg: the running sum of n_k d_k (aggregation.MeanMerge)
        for client in clients:
            update = self.client_update(round_index, int(client), lr)
            n_k = len(self.shards[client])  # FedAvg weighs a client by its data size
            merge.add(update.delta[self.entries], n_k, **self.merge_inputs(round_index, int(client)))
            log.saw(update)
            if self.control is not None:  # SCAFFOLD: the client's new control variate
                taken = update.steps - update.skipped_steps  # a step the fp16 scaler skipped did not move y_i
                steps = effective_steps(taken, config.momentum)
                self.control.client_done(int(client), update.delta[self.entries], steps * lr)
        if self.control is not None:
            self.control.round_done()
        average_delta = torch.zeros_like(self.global_weights)
        average_delta[self.entries] = merge.result()  # merged over the entries that train
        server_update(
            self.global_weights,
            average_delta,
            self.velocity,
            server_lr=config.server_lr,
            server_momentum=config.server_momentum,
        )
        self.scaler_state = log.scaler_state()
        return {
            "round": round_index + 1,
            "clients": " ".join(str(int(c)) for c in clients),
            "lr": lr,
            **log.row(average_delta),
            **self.traffic(len(clients)),
        }

    def client_update(self, round_index: int, client: int, lr: float) -> ClientUpdate:
        """`client_update` of one client of the round, from w_t and the run's loss-scaler state."""
        return client_update(
            self.model,
            self.params,
            self.global_weights,
            self.client_batches(round_index, client),
            optimizer=self.new_optimizer(lr, **self.client_terms(client)),
            precision=self.precision,
            scaler_state=self.scaler_state,
        )

    def new_merge(self):
        """The round's merge of the client deltas (config.merge_rule; aggregation.py)."""
        options = {"density": self.config.ties_density} if self.config.merge_rule == "ties" else {}
        return make_merge(self.config.merge_rule, self.entries_sent, self.device, **options)

    def merge_inputs(self, round_index: int, client: int) -> dict:
        """What the merge needs of a client beside its delta: for the Fisher merge, its Fisher."""
        if self.config.merge_rule != "fisher":
            return {}
        return {"fisher": self.client_fisher(round_index, client)[self.entries]}

    def client_fisher(self, round_index: int, client: int) -> torch.Tensor:
        """The client's diagonal Fisher at its end weights (the model as the client left it), from
        merge_fisher_samples of its images (labels sampled from the model: the true Fisher), flat like
        its delta."""
        config = self.config
        rng = numpy_rng(config.seed, "merge-fisher", round_index, client)
        shard = self.shards[client]
        chosen = rng.choice(shard, size=min(config.merge_fisher_samples, len(shard)), replace=False)
        index = torch.from_numpy(np.sort(chosen)).to(self.device)
        batch = make_batch(self.data.train, index, self.img_size)  # no augmentation
        generator = torch_generator(
            config.seed, "merge-fisher-labels", round_index, client, device=self.device
        )
        names = self.prepared.trainable_names
        sums, samples = fisher_sums(self.model, [batch], "sampled", names, generator=generator)
        return read_flat([sums[name] for name in names]) / samples

    def client_terms(self, client: int) -> dict:
        """What the client's optimizer adds to its gradients (SparseSGDM): FedProx's pull towards w_t,
        SCAFFOLD's c - c_i; nothing for FedAvg."""
        if self.config.algorithm == "fedprox":
            return {"prox_mu": self.config.prox_mu, "anchors": self.per_parameter(self.global_weights)}
        if self.control is None:
            return {}
        correction = torch.zeros_like(self.global_weights)
        correction[self.entries] = self.control.correction(client).to(self.device)
        return {"corrections": self.per_parameter(correction)}

    def per_parameter(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector (read_flat's layout) shaped like the trainable parameters."""
        chunks = flat.split([p.numel() for p in self.params])
        return [chunk.view_as(p) for chunk, p in zip(chunks, self.params)]

    def client_lr(self, round_index: int) -> float:
        """The clients' lr in this round: constant, or cosine over the rounds."""
        if self.config.lr_schedule == "constant":
            return self.config.lr
        return self.config.lr * lr_multiplier("cosine", round_index, self.config.rounds)

    def traffic(self, clients: int) -> dict:
        """Bytes sent to and from the round's clients: vectors over the trainable entries, as float32; one
        each way (w_t, the delta), and SCAFFOLD's c down and c_i+ - c_i up, the Fisher merge's F_k up."""
        scaffold = self.config.algorithm == "scaffold"
        down = 1 + scaffold
        up = 1 + scaffold + (self.config.merge_rule == "fisher")
        bytes_per_vector = clients * BYTES_PER_ENTRY * self.entries_sent
        return {"bytes_down": down * bytes_per_vector, "bytes_up": up * bytes_per_vector}

    def summary(self) -> dict:
        return {**super().summary(), "trainable_entries": self.entries_sent}

    def finish(self, save_weights: bool) -> RunResult:
        load_flat(self.params, self.global_weights)  # the model holds the final global weights
        return super().finish(save_weights)

    def client_batches(self, round_index: int, client: int):
        """The client's J augmented batches, from its own seed stream (seed, round, client)."""
        config = self.config
        positions = client_batch_indices(
            self.shards[client],
            config.local_steps,
            config.batch_size,
            config.seed,
            round_index=round_index,
            client=client,
        )
        generator = (
            augmentation_generator(config.seed, "round", round_index, "client", client, device=self.device)
            if config.augment
            else None
        )
        return training_batches(
            self.data.train, self.img_size, torch.from_numpy(positions).to(self.device), generator
        )
