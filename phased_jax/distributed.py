"""Multi-host start-up: JAX's own `jax.distributed` runtime, on a pod or as local processes.

On a TPU pod every worker runs the same command and `jax.distributed.initialize()` finds its
peers by itself. `--local-pod N` runs the same entry point as N local CPU processes talking
over 127.0.0.1 with gloo collectives: the multi-host code path, testable on a laptop.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from typing import Any

import jax
import numpy as np

ENV_COORDINATOR = "PHASED_COORDINATOR"
ENV_NUM_PROCESSES = "PHASED_NUM_PROCESSES"
ENV_PROCESS_ID = "PHASED_PROCESS_ID"
ENV_LOCAL_DEVICES = "PHASED_LOCAL_DEVICES"


def initialize(auto: bool = False) -> None:
    """Join the run's processes: from a local pod's environment, or JAX's auto-detection on pods.

    `auto` calls `jax.distributed.initialize()` with no arguments (TPU pods, SLURM, ...). A
    single process with neither does nothing.
    """
    if ENV_COORDINATOR in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_num_cpu_devices", int(os.environ[ENV_LOCAL_DEVICES]))
        jax.distributed.initialize(
            coordinator_address=os.environ[ENV_COORDINATOR],
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
        )
    elif auto:
        jax.distributed.initialize()


def from_process_0(value: Any, max_bytes: int = 65536) -> Any:
    """Process 0's `value` (JSON-serialisable) on every process: one decision for all hosts.

    Every process must call it at the same point; only process 0's argument is used.
    """
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    raw = json.dumps(value).encode() if jax.process_index() == 0 else b""
    if len(raw) > max_bytes:
        raise ValueError(f"a value of {len(raw)} bytes is too large to broadcast")
    data = multihost_utils.broadcast_one_to_all(np.frombuffer(raw.ljust(max_bytes, b" "), np.uint8))
    return json.loads(bytes(np.asarray(data)).decode())


def all_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective: call it on all of them), so every
    process reaches the same decision after a step that only some of them did."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def gather_texts(text: str, max_bytes: int = 2000) -> list[str]:
    """Every process's `text` (cut to `max_bytes`), in process order, on every process."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    raw = text.encode()[:max_bytes].ljust(max_bytes, b"\0")
    rows = np.asarray(multihost_utils.process_allgather(np.frombuffer(raw, np.uint8)))
    return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows.reshape(-1, max_bytes)]


def shared_token() -> str:
    """A random 8-hex-digit token, the same on every process (a collective in multi-process):
    the temp name of an output that several processes write together."""
    if jax.process_count() == 1:
        return uuid.uuid4().hex[:8]
    from jax.experimental import multihost_utils

    value = np.uint32(uuid.uuid4().int & 0xFFFFFFFF)
    return f"{int(multihost_utils.broadcast_one_to_all(value)):08x}"


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def _die_with_parent() -> None:
    """In a worker, before exec: SIGKILL it when the launcher dies (Linux), so a killed local
    pod leaves no worker waiting forever on a collective."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def launch_local_pod(num_processes: int, command: list[str], devices_per_process: int) -> int:
    """Run `command` as `num_processes` local processes of one JAX run; return the worst exit code.

    If one process fails the others are stopped, so a broken pod never hangs on a collective.
    """
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(num_processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
                    ENV_PROCESS_ID: str(pid), ENV_LOCAL_DEVICES: str(devices_per_process)})
        env.pop("XLA_FLAGS", None)  # the device count comes from ENV_LOCAL_DEVICES
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      preexec_fn=_die_with_parent))
    relays = [threading.Thread(target=_relay, args=(p.stdout, f"[process {i}] "), daemon=True)
              for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    codes: dict[int, int] = {}
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            if i in codes:
                continue
            try:
                codes[i] = p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            if codes[i] != 0:
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
    for t in relays:
        t.join(timeout=5)
    return max(codes.values(), key=abs)
