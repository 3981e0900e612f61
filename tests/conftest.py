"""Shared fixtures: small synthetic data and a throw-away workspace.

Nothing here touches the network: the data is synthetic and the model is
tiny_vit (random init), as in the smoke profile.
"""

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # keep test logs readable

import shutil

import numpy as np
import pytest
import torch
from smoke_fixture import smoke_pipeline, smoke_results, smoke_stage, start_smoke_pipeline  # noqa: F401

from fedta_utils.workspace import setup_workspace

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests that read the smoke pipeline are slow, and run last: the pipeline runs in the background
    (smoke_fixture.py) while the others run. The order: the quick tests, the other slow ones, the tests
    that compare with the pipeline once their own scenario has run, the tests that read it from the start."""
    for item in items:
        if smoke_stage(item):
            item.add_marker(pytest.mark.slow)

    def order(item) -> tuple[int, int]:
        return smoke_stage(item), int(item.get_closest_marker("slow") is not None)

    items.sort(key=order)  # stable: within a stage, pytest's own order


# The report-PDF tests need TeX Live. `make test` installs it where it may; elsewhere they are skipped
# with the command that installs it, except under FEDTA_REQUIRE_TEX (set by CI), where they fail.
INSTALL_TEX = (
    "sudo apt-get install -y latexmk texlive-latex-extra texlive-fonts-recommended "
    "texlive-bibtex-extra lmodern"
)
needs_tex = pytest.mark.skipif(
    shutil.which("latexmk") is None and not os.environ.get("FEDTA_REQUIRE_TEX"),
    reason=f"latexmk is missing; install TeX Live: {INSTALL_TEX}",
)


@pytest.fixture
def workspace(tmp_path):
    return setup_workspace(
        profile="smoke",
        results_dir=tmp_path / "results",
        data_dir=tmp_path / "data",
        device="cpu",
        download=False,
    )


@pytest.fixture(scope="session")
def small_data():
    """2,000 synthetic training images (1,800 / 200 after the split) and 500 test images, 100 classes."""
    from fedta_utils.data import prepare_data

    return prepare_data("synthetic", synthetic_train_size=2000, synthetic_test_size=500)


@pytest.fixture(scope="session")
def cifar_like_labels():
    """Labels shaped like CIFAR-100's train split: 450 per class, shuffled."""
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(100), 450))
