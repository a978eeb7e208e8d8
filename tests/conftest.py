"""Test setup: offline, deterministic, single-threaded enough for 2-core CI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the project root; tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def tiny_run_config():
    """The shipped debug config with overrides, as the CLI would build it."""
    from qstar.cli import resolve_config
    from qstar.run_config import load_run_config

    def make(*overrides: str):
        return load_run_config(resolve_config("debug_tiny"), ["logging.progress=false", *overrides])

    return make


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the in-process sweep tests (Ray 2.60 has no local mode)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
