"""Tests run on CPU with 8 fake devices, so sharding is exercised without an accelerator."""

import os
from pathlib import Path

from tests.xla import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (CI has it; a user's fresh clone does not)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared test data at {SHARED_DATA} (absent in a fresh clone)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def subprocess_compile_cache(tmp_path_factory) -> None:
    """One persistent compilation cache for the session's subprocesses (`phased-jax train` runs,
    local-pod workers, CLI calls), which compile the same few programs again and again: the
    same executables, so the same numbers, at half a run's CPU time. Set after collection, so
    this process's JAX (imported by then) compiles as before and counts its own compiles."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        base = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            base = base.parent  # one cache for both workers' subprocesses (JAX locks its files)
        (base / "jax_cache").mkdir(exist_ok=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(base / "jax_cache")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files marked slow first (in their order), the rest after: `make test`'s two workers
    take a file at a time in this order, so the long ones start early and the short ones fill
    the end evenly."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: each file's order is kept
