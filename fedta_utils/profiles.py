"""Parameter values per profile. A profile changes values, never code paths.

full: the notebooks' own defaults (their parameters cells): CIFAR-100, DINO
      ViT-S/16, K=100, C=0.1, for a GPU.
smoke: the same notebooks on synthetic CIFAR-shaped data and tiny_vit, small
      grids, so the whole pipeline runs offline on a 2-core CPU in minutes.
      Every figure, table and number it produces is labelled 'smoke'.

Each value below is passed to every notebook that declares a parameter of
that name; notebooks that do not declare it are not affected.
"""

from __future__ import annotations

from .checks import check_choice

SMOKE = {
    # data and model
    "dataset": "synthetic",
    "model": "tiny_vit",
    "synthetic_train_size": 2000,
    "synthetic_test_size": 500,
    "seeds": [0, 1],
    "eval_batch_size": 128,  # fastest on a 2-core CPU (bench: 4.5k vs 3.8k images/s at 500)
    # notebooks 00 and 03: K stays 100; 18 images per class cannot fill Nc=50's 50 slices
    "classes_per_client_grid": [1, 5, 10],
    # notebook 01
    "search_lrs": [0.03, 0.1],
    "search_weight_decays": [0.0, 5e-4],
    "search_epochs": 1,
    "epochs": 3,
    "batch_size": 64,
    "schedulers": ["cosine", "step", "constant"],
    "warmup_epochs": 0.5,
    # notebooks 02-05
    "local_steps": 2,
    "rounds": 6,
    "base_rounds": 6,
    "local_steps_grid": [2, 4],
    "eval_every": 2,
    "sparsities": [0.5, 0.9],
    "calibration_rounds_grid": [1, 2],
    "sparse_classes_per_client": 5,
    "calibration_samples": 200,
    "sparse_central_epochs": 1,
    "central_calibration_rounds": 2,
    "rules": ["least_sensitive", "most_sensitive", "lowest_magnitude", "highest_magnitude", "random"],
    "rule_sparsities": [0.9],
    "rule_calibration_rounds": 2,
    "probe_rounds": 20,
}

PROFILES = {"full": {}, "smoke": SMOKE}


def profile_values(profile: str) -> dict:
    """The parameter values that `profile` sets (full sets none: the notebook defaults are full)."""
    check_choice("profile", profile, tuple(PROFILES))
    return dict(PROFILES[profile])
