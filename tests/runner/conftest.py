"""A tiny 3-phase experiment: generated graded tasks and a local tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory) -> dict:
    """Data (200 graded records: phases of 15, 8 and 4 steps at batch 8) and a tokenizer."""
    from phased_jax.data.toy_tokenizer import build_tokenizer
    from phased_jax.demo.tasks import build_dataset, texts_for_tokenizer

    root = tmp_path_factory.mktemp("tiny_experiment")
    info = build_dataset(root / "data", n_train=200, n_test=12, seed=1)
    records = [json.loads(line) for line in Path(info["train"]).read_text().splitlines()]
    tok = build_tokenizer(texts_for_tokenizer(records), 320, root / "tok")
    return {"data": str(info["train"]), "tok": str(root / "tok"), "vocab": len(tok),
            "root": root}



@pytest.fixture(scope="session")
def reference(tiny_experiment, tmp_path_factory):
    """The uninterrupted run every resumed one must end equal to."""
    from tests.runner.runs import train, write_config

    out = tmp_path_factory.mktemp("reference") / "run"
    train(write_config(tiny_experiment, out))
    return out


@pytest.fixture(scope="session")
def pod_reference(tiny_experiment, tmp_path_factory):
    """The uninterrupted run as a local pod of 2 processes x 4 devices (bitwise what a resumed
    pod run must end as; within float noise of the one-process `reference`)."""
    from tests.runner.runs import POD, train, write_config

    out = tmp_path_factory.mktemp("pod_reference") / "run"
    proc = train(write_config(tiny_experiment, out), *POD)
    assert "[process 1]" in proc.stdout
    return out
