"""A tiny 3-phase experiment: generated graded tasks and a local tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.once import once


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory) -> dict:
    """Data (200 graded records: phases of 15, 8 and 4 steps at batch 8) and a tokenizer."""

    def build(root: Path) -> dict:
        from phased_jax.data.toy_tokenizer import build_tokenizer
        from phased_jax.demo.tasks import build_dataset, texts_for_tokenizer

        info = build_dataset(root / "data", n_train=200, n_test=12, seed=1)
        records = [json.loads(line) for line in Path(info["train"]).read_text().splitlines()]
        tok = build_tokenizer(texts_for_tokenizer(records), 320, root / "tok")
        return {"data": str(info["train"]), "tok": str(root / "tok"), "vocab": len(tok),
                "root": str(root)}

    made = once(tmp_path_factory, "tiny_experiment", build)
    return {**made, "root": Path(made["root"])}


@pytest.fixture(scope="session")
def reference(tiny_experiment, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must end equal to."""
    from tests.runner.runs import train, write_config

    def build(root: Path) -> dict:
        train(write_config(tiny_experiment, root / "run"))
        return {"out": str(root / "run")}

    return Path(once(tmp_path_factory, "reference", build)["out"])


@pytest.fixture(scope="session")
def pod_reference(tiny_experiment, tmp_path_factory) -> Path:
    """The uninterrupted run as a local pod (`runs.POD`: bitwise what a resumed pod run must end
    as; within float noise of the one-process `reference`)."""
    from tests.runner.runs import POD, train, write_config

    def build(root: Path) -> dict:
        proc = train(write_config(tiny_experiment, root / "run"), *POD)
        assert "[process 1]" in proc.stdout
        return {"out": str(root / "run")}

    return Path(once(tmp_path_factory, "pod_reference", build)["out"])
