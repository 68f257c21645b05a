"""Expensive session fixtures built once per test session, also under pytest-xdist (`make test`
runs two workers): the first worker to need one builds it under a file lock, in the directory
the workers share, and the others wait for it and read its JSON description."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock


def once(tmp_path_factory: pytest.TempPathFactory, name: str,
         build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """`build(directory)`'s JSON-able result; `directory` (empty) is the fixture's to fill."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's directory, above each worker's own
    done = base / f"{name}.json"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            directory = base / name
            if directory.exists():
                shutil.rmtree(directory)  # a build that failed earlier in this session
            directory.mkdir()
            done.write_text(json.dumps(build(directory)))
        return json.loads(done.read_text())
