"""The workspace a notebook works in: profile, results folder, device, data, tuned values.

    ws, data, params = setup_notebook("02", globals())   # the first code cell after the parameters

Everything a run writes goes under `ws.root` = <results_dir>/<profile>, so smoke and full
results never mix. With `drive_dir` set, Google Drive is mounted (on Colab) and results_dir is
taken relative to it, so checkpoints survive a disconnect.

Profiles: `full` is the notebooks' own defaults (their parameters cells); `smoke` is the
parameters file notebooks/smoke.yaml, which papermill reads with `-f` and the pipeline passes
the same way. A profile changes values, never code paths.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import __version__, experiments, team
from .checks import ConfigError, check_bool, check_choice, check_float, check_path
from .data import DataBundle, prepare_data
from .models import PRECISIONS, build_model, resolve_precision
from .runs import RUNS_DIR, STAGING_DIR, Run, atomic_write_bytes, atomic_write_json, read_json

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
PROFILES = ("smoke", "full")
# Part of every run's identity: raised whenever results change without a config changing, so runs of
# older code are never read back as complete or resumed (2: random non-iid class sets, new seed streams;
# 3: every row logs samples, skipped and clipped steps, which a checkpoint's rows and carry hold).
RESULTS_FORMAT = 3
COLAB_DRIVE_MOUNT = "/content/drive"
# What each profile must load, so results are never labelled with the wrong profile.
PROFILE_INPUTS = {
    "smoke": {"dataset": "synthetic", "model": "tiny_vit"},
    "full": {"dataset": "cifar100", "model": "dino_vits16"},
}
# The workspace block that ends every parameters cell, in this order, after the experiment's own knobs (a
# notebook declares those it uses; notebooks 01-05 all of them).
WORKSPACE_PARAMETERS = (
    "profile",
    "results_dir",
    "drive_dir",
    "data_dir",
    "dataset",
    "val_fraction",
    "split_seed",
    "synthetic_train_size",
    "synthetic_test_size",
    "model",
    "weights_path",
    "precision",
    "eval_batch_size",
    "checkpoint_every",
    "checkpoint_minutes",
    "allow_code_change",
    "worker",
    "wait_limit",
)
# A parameter left None takes the value an earlier notebook chose on validation: name -> (hparams.json
# key, the notebook whose search stores it). FedAvg's client lr is tuned for FedAvg, not reused from 01;
# fine-tuning under a frozen head gets its own (sparse_lr, sparse_central_lr), since the head sets its
# gradients' scale; notebook 04's centralized sparse baseline takes 01's chosen scheduler and its weight
# decay.
CHOSEN = {
    "lr": ("fedavg_lr", "02"),
    "weight_decay": ("fedavg_weight_decay", "02"),
    "central_scheduler": ("central_scheduler", "01"),
    "central_weight_decay": ("central_weight_decay", "01"),
    "sparse_lr": ("sparse_lr", "04"),
    "sparse_central_lr": ("sparse_central_lr", "04"),
}


@functools.cache
def code_version() -> str:
    """The git commit of the checkout the package runs from, else the package version."""
    checkout = NOTEBOOK_DIR.parent
    try:
        answer = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=checkout,
            text=True,
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        answer = []
    if len(answer) == 2 and Path(answer[0]).resolve() == checkout.resolve():
        return answer[1]
    return f"fedta_utils {__version__}"  # installed, not a checkout (or one inside another repository)


def discover_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> dict[str, Path]:
    """{'00': .../00_data_splits.ipynb, ...} for every numbered notebook, in order."""
    return {path.name[:2]: path for path in sorted(Path(notebook_dir).glob("[0-9][0-9]_*.ipynb"))}


def declared_parameters(path: Path) -> dict[str, dict]:
    """A notebook's parameters cell, in cell order: name -> {'name', 'inferred_type_name' (the
    annotation), 'default' (source text), 'help' (the line's comment)}, the entries of
    papermill.inspect_notebook. Read with ast, since papermill's own pattern skips a parameter
    annotated `float | None` (papermill still injects its value)."""
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    tagged = [cell for cell in cells if "parameters" in cell["metadata"].get("tags", [])]
    source = "".join(tagged[0]["source"]) if tagged else ""
    entries = [parameter_entry(statement, source) for statement in ast.parse(source).body]
    return {entry["name"]: entry for entry in entries if entry is not None}


def parameter_entry(statement: ast.stmt, source: str) -> dict | None:
    """declared_parameters' entry for one statement of a parameters cell; None for anything but
    `name = value` or `name: annotation = value`."""
    if isinstance(statement, ast.AnnAssign):
        target, annotation = statement.target, ast.get_source_segment(source, statement.annotation)
    elif isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target, annotation = statement.targets[0], "None"
    else:
        return None
    if not isinstance(target, ast.Name) or statement.value is None:
        return None
    last_line = source.splitlines()[statement.end_lineno - 1].encode()
    comment = last_line[statement.end_col_offset :].decode().strip()  # offsets count bytes
    return {
        "name": target.id,
        "inferred_type_name": annotation,
        "default": ast.get_source_segment(source, statement.value),
        "help": comment.removeprefix("#").strip(),
    }


def profile_values(profile: str) -> dict:
    """The parameter values `profile` sets: none for full, notebooks/<profile>.yaml otherwise."""
    check_choice("profile", profile, PROFILES)
    if profile == "full":
        return {}
    return yaml.safe_load((NOTEBOOK_DIR / f"{profile}.yaml").read_text())


@dataclass
class Workspace:
    results_dir: Path
    profile: str
    device: torch.device
    data_dir: Path
    download: bool
    weights_path: str | None
    pretrained: bool = True  # False: random backbone weights (benchmarks offline); never for results
    allow_code_change: bool = False  # resume runs that other code started (runs.Run)

    @property
    def root(self) -> Path:
        """<results_dir>/<profile>: every run, split and cache of this profile."""
        return self.results_dir / self.profile

    def run(self, name: str, config: dict) -> Run:
        """The run of `config` in the store; its identity holds the precision this device resolves
        ('auto' never), so runs of other precisions never mix under one identity.

        With precision 'auto', a run that another device started at the precision it resolved (a T4's
        fp16 against an A100's bf16) is refused, naming both: it would be trained again here instead of
        resumed. An explicit precision is the user's choice and never refused."""
        identity = {**config, "results_format": RESULTS_FORMAT}
        if "precision" in identity:
            identity["precision"] = resolve_precision(identity["precision"], self.device)
        run = Run(
            self.root, name, identity, code_version=code_version(), allow_code_change=self.allow_code_change
        )
        if config.get("precision") == "auto" and not run.dir.exists():  # this device's own run goes on
            self._refuse_other_precisions(run, name)
        return run

    def _refuse_other_precisions(self, run: Run, name: str) -> None:
        here = run.config["precision"]
        for other in sorted(set(PRECISIONS) - {"auto", here}):
            twin = Run(self.root, name, {**run.config, "precision": other})
            if twin.dir.exists():
                raise ConfigError(
                    f"{twin.dir} holds this run at precision {other}, started on another device, and this "
                    f"device resolves precision='auto' to {here}: it would be trained again. Set "
                    f"precision={other!r} to continue that run here, or precision={here!r} to train it "
                    "anew at this device's precision"
                )

    def build_model(self, name: str, num_classes: int, head_seed: int, img_size: int | None = None):
        """The run's model at `img_size` (None: native): pretrained backbone, head from `head_seed`."""
        return build_model(
            name,
            num_classes,
            self.pretrained,
            self.weights_path,
            head_seed=head_seed,
            img_size=img_size,
        )

    def load_data(
        self,
        dataset: str = "cifar100",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        synthetic_train_size: int = 50_000,
        *,
        synthetic_test_size: int = 10_000,
    ) -> DataBundle:
        """The dataset on `self.device`, split once per results folder (stored under <root>/splits).

        prepare_data checks every argument before it loads or writes anything."""
        return prepare_data(
            dataset,
            self.data_dir,
            self.download,
            val_fraction,
            split_seed=split_seed,
            split_dir=self.root / "splits",
            device=self.device,
            synthetic_train_size=synthetic_train_size,
            synthetic_test_size=synthetic_test_size,
        )

    def save_frame(self, relative_path: str, frame) -> Path:
        """Write a DataFrame as CSV under the results root, atomically; returns the path."""
        path = self.root / relative_path
        atomic_write_bytes(path, frame.to_csv(index=False).encode())
        return path

    @property
    def hparams_path(self) -> Path:
        """<root>/hparams.json: the values chosen on validation so far."""
        return self.root / "hparams.json"

    def save_hparams(self, values: dict) -> None:
        """Record values chosen on the validation split (read by later notebooks)."""
        atomic_write_json(self.hparams_path, {**self.load_hparams(), **values})

    def load_hparams(self) -> dict:
        """Every value stored so far ({} before the first search)."""
        return read_json(self.hparams_path)

    def chosen(self, name: str, scheduler: str | None = None) -> float | str:
        """The value of parameter `name` (a key of CHOSEN) that an earlier notebook chose on validation;
        central_weight_decay: the one notebook 01 chose for `scheduler` (None: for its best scheduler)."""
        stored, source = CHOSEN[name]
        if stored not in (values := self.load_hparams()):
            raise ConfigError(
                f"{name}=None takes {stored} from {self.hparams_path}, which notebook {source} "
                f"stores after its search: run notebook {source} first with the same "
                f"results_dir and profile, or set {name} in the parameters cell"
            )
        per_scheduler = values.get("scheduler_search", {})
        if name == "central_weight_decay" and scheduler in per_scheduler:
            return per_scheduler[scheduler]["weight_decay"]
        return values[stored]


def setup_workspace(
    profile: str = "full",
    results_dir: str | Path = "results",
    drive_dir=None,
    data_dir: str | Path = "data",
    *,
    device: str = "auto",
    weights_path=None,
    download: bool = True,
) -> Workspace:
    """Check the parameters, mount Drive if asked, make sure results_dir is writable."""
    check_choice("profile", profile, PROFILES)
    check_bool("download", download)
    results_dir = check_path("results_dir", results_dir)
    data_dir = check_path("data_dir", data_dir)
    if drive_dir:
        results_dir = mount_drive(check_path("drive_dir", drive_dir)) / results_dir
    if weights_path and not check_path("weights_path", weights_path).is_file():
        raise ConfigError(f"weights_path={str(weights_path)!r} is not a file; leave it empty to download")
    ws = Workspace(
        results_dir.resolve(),
        profile,
        resolve_device(device),
        data_dir,
        download,
        str(weights_path) if weights_path else None,
    )
    make_writable_root(ws.root)
    warn_about_old_layout(ws.root)
    return ws


def warn_about_old_layout(root: Path) -> None:
    """Run folders of an older fedta (one folder per experiment) are never read: say so, once per setup."""
    old = sorted(p.name for p in root.glob("[0-9][0-9]_*") if any(p.glob("*/config.json")))
    if old:
        warnings.warn(
            f"{root} holds run folders of an older fedta layout ({', '.join(old)}); they are not read "
            f"(runs now live in {root / RUNS_DIR}): move them away or start a new results_dir",
            RuntimeWarning,
            stacklevel=3,
        )


def setup_notebook(key: str, namespace: dict, device: str = "auto"):
    """(workspace, data or None, parameters) for notebook `key`, from the names its parameters cell declares.

    Parameters of CHOSEN left None take the value an earlier notebook chose on validation. Every
    parameter of every grid the notebook runs is checked here, before its first run. A
    profile that disagrees with what the notebook would load (smoke with CIFAR-100 or DINO, full
    with synthetic data or tiny_vit) is refused before anything is loaded.
    """
    params = {name: namespace[name] for name in declared_parameters(discover_notebooks()[key])}
    check_profile_inputs(params)
    worker = team.parse_worker(params.get("worker"))  # a bad worker is refused before anything is written
    check_float("wait_limit", params.get("wait_limit", 3600), 0.0, low_open=True)
    ws = setup_workspace(
        params["profile"],
        params["results_dir"],
        params.get("drive_dir"),
        params.get("data_dir", "data"),
        device=device,
        weights_path=params.get("weights_path"),
    )
    ws.allow_code_change = check_bool("allow_code_change", params.get("allow_code_change", False))
    # Every grid the notebook runs, before anything loads or waits (a chosen value not read yet: a stand-in).
    grids = experiments.check_notebook(key, params)
    read_chosen(ws, key, params, wait=worker is not None)
    check_central_schedule(ws, key, params)
    data = load_notebook_data(ws, params)
    for grid in grids:  # shards the data cannot make (Nc above its classes), before the first run
        experiments.check_against_data(grid["configs"], data)
    return ws, data, params


def check_profile_inputs(params: dict) -> None:
    """Refuse a profile that disagrees with the dataset or model the notebook would load (PROFILE_INPUTS)."""
    profile = check_choice("profile", params["profile"], PROFILES)
    for name, expected in PROFILE_INPUTS[profile].items():
        if name in params and params[name] != expected:
            raise ConfigError(
                f"profile={profile!r} with {name}={params[name]!r}: profile {profile!r} loads "
                f"{name}={expected!r}; change one of them so results are labelled correctly"
            )


def read_chosen(ws: Workspace, key: str, params: dict, *, wait: bool) -> None:
    """Set each parameter of CHOSEN that notebook `key` left None to the value an earlier notebook chose
    (Workspace.chosen), in place; one that `key` chooses itself stays None until its search runs.
    `wait` (a worker): wait up to wait_limit for another worker still running that search."""
    for name, (stored, source) in CHOSEN.items():
        if name not in params or params[name] is not None or source == key:
            continue
        if wait:

            def missing(stored=stored, source=source) -> str:
                """What is still missing: the stored choice, or nothing."""
                if stored in ws.load_hparams():
                    return ""
                return f"{stored} in hparams.json (notebook {source}'s search, all workers)"

            team.wait_for(missing, params.get("wait_limit", 3600))
        params[name] = ws.chosen(name, params.get("central_scheduler"))  # CHOSEN has it first


def check_central_schedule(ws: Workspace, key: str, params: dict) -> None:
    """Notebook 04's centralized sparse baseline runs notebook 01's schedule: each parameter of
    experiments.CENTRAL_SCHEDULE that notebook `key` declares must equal the value 01 stored with its
    choice (checked once 01 has stored it)."""
    stored = ws.load_hparams()
    for name, field in experiments.CENTRAL_SCHEDULE.items():
        used = stored.get(f"central_{field}")
        if key == "01" or name not in params or used is None or params[name] == used:
            continue
        raise ConfigError(
            f"{name}={params[name]!r}, but notebook 01 ran its schedulers with {name}={used!r} "
            f"({ws.hparams_path}): the centralized sparse baseline shares 01's schedule; set {name}={used!r}"
        )


def load_notebook_data(ws: Workspace, params: dict) -> DataBundle | None:
    """The data set the parameters name (None for a notebook without `dataset`), its sizes printed."""
    if "dataset" not in params:
        return None
    data = ws.load_data(
        params["dataset"],
        params["val_fraction"],
        params["split_seed"],
        params["synthetic_train_size"],
        synthetic_test_size=params["synthetic_test_size"],
    )
    print(
        f"results: {ws.root} | device: {ws.device} | train/val/test: "
        f"{len(data.train)}/{len(data.val)}/{len(data.test)}"
    )
    return data


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; 'cuda' without a GPU is an error."""
    if not isinstance(device, str):
        raise ConfigError(f"device must be a string: 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise ConfigError(
            f"device={device!r} is not allowed; choose one of 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use device='auto' or 'cpu'")
    return torch.device(device)


def mount_drive(drive_dir: Path) -> Path:
    """`drive_dir`, created; on Colab, Google Drive mounted first when it is a Drive path."""
    if str(drive_dir).startswith(COLAB_DRIVE_MOUNT):
        try:
            from google.colab import drive  # only on Colab
        except ImportError:
            raise ConfigError(
                f"drive_dir={str(drive_dir)!r} is a Google Drive path but this is not Colab; "
                "leave drive_dir empty or point it at a local folder"
            ) from None
        if not Path(COLAB_DRIVE_MOUNT, "MyDrive").is_dir():
            drive.mount(COLAB_DRIVE_MOUNT)
    if not drive_dir.parent.is_dir():
        raise ConfigError(f"drive_dir={str(drive_dir)!r}: its parent folder does not exist")
    drive_dir.mkdir(exist_ok=True)
    return drive_dir


def make_writable_root(root: Path) -> None:
    """Create <root>/.staging and write a probe file there (a unique name: other processes probe too)."""
    try:
        (root / STAGING_DIR).mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(prefix=".write-test.", suffix=".tmp", dir=root / STAGING_DIR)
        probe.close()  # which deletes it
    except OSError as error:
        raise ConfigError(
            f"results_dir={str(root.parent)!r} is not writable ({error}); choose a folder you can write to"
        ) from error
