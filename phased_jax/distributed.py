"""Multi-host start-up: JAX's own `jax.distributed` runtime, on a pod or as local processes.

On a TPU pod every worker runs the same command and `jax.distributed.initialize()` finds its
peers by itself. `--local-pod N` runs the same entry point as N local CPU processes talking
over 127.0.0.1 with gloo collectives: the multi-host code path, testable on a laptop. Its
launcher watches the workers: a pod that stops making progress is stopped, with every worker's
Python stacks on file (`launch_local_pod`).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import jax
import numpy as np

from phased_jax import preemption

ENV_COORDINATOR = "PHASED_COORDINATOR"
ENV_NUM_PROCESSES = "PHASED_NUM_PROCESSES"
ENV_PROCESS_ID = "PHASED_PROCESS_ID"
ENV_LOCAL_DEVICES = "PHASED_LOCAL_DEVICES"
ENV_HEARTBEAT = "PHASED_HEARTBEAT"  # a local pod worker's heartbeat file: its last global step
ENV_STACKS = "PHASED_STACKS"  # where a local pod worker writes its Python stacks on SIGUSR1
WATCHDOG_EXIT = 124  # a local pod stopped for making no progress (as timeout(1) exits)
_stacks_file: IO[str] | None = None  # kept open: faulthandler writes to its descriptor


def initialize(auto: bool = False) -> None:
    """Join the run's processes: from a local pod's environment, or JAX's auto-detection on pods.

    `auto` calls `jax.distributed.initialize()` with no arguments (TPU pods, SLURM, ...). A
    single process with neither does nothing.
    """
    if ENV_COORDINATOR in os.environ:
        _arm_stack_dump()
        heartbeat()
        # Plain gloo, no extra setting: a pod once hung for good in gloo all-gathers (issue 21)
        # but 40 runs of that shape did not hang again, and nothing non-deterministic was found:
        # every cross-process collective comes from the main thread in the same order on every
        # process (checked), XLA:CPU runs one multi-device program at a time, a program's
        # collectives in program order. The launcher's watchdog catches a recurrence.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_num_cpu_devices", int(os.environ[ENV_LOCAL_DEVICES]))
        preemption.arm_early()
        jax.distributed.initialize(
            coordinator_address=os.environ[ENV_COORDINATOR],
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
        )
        preemption.pass_on_early()
    elif auto:
        preemption.arm_early()
        jax.distributed.initialize()
        preemption.pass_on_early()


def _arm_stack_dump() -> None:
    """In a local pod worker: SIGUSR1 writes every thread's Python stack to `$PHASED_STACKS`.

    faulthandler dumps from its C signal handler, so it works while the main thread is blocked
    inside XLA (a hung collective), where a Python-level handler would never run."""
    global _stacks_file
    path = os.environ.get(ENV_STACKS)
    if path and hasattr(signal, "SIGUSR1") and _stacks_file is None:
        _stacks_file = open(path, "w")  # noqa: SIM115 (open for the process's life)
        faulthandler.register(signal.SIGUSR1, file=_stacks_file, all_threads=True)


def heartbeat(global_step: int | None = None) -> None:
    """Tell a local pod's watchdog that this worker made progress (`global_step`: the step it
    just finished); a no-op outside a local pod. Written whole (rename), so never read torn."""
    path = os.environ.get(ENV_HEARTBEAT)
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write("" if global_step is None else str(int(global_step)))
        os.replace(tmp, path)


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


def to_host(tree: Any) -> Any:
    """A tree of (possibly sharded, multi-host) arrays as whole numpy arrays on every process:
    a collective on a pod, so every process must call it at the same point. For small trees
    (LoRA adapters); a model's params are exported a layer at a time instead (`hf.save`)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


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


def without_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`argv` less the flags `names` (`--name VALUE` or `--name=VALUE`): a local pod's worker
    command is the launcher's without the launcher's own flags."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True  # its value is the next word
        elif a.split("=")[0] not in names:
            out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(stream: IO[str], prefix: str, on_line: Callable[[], None]) -> None:
    for line in iter(stream.readline, ""):
        on_line()
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


class _Progress:
    """When a local pod last made progress: a worker's heartbeat file changed (it started, or
    finished a step), a worker printed a line, or a worker was busy on the CPU (compiling,
    reading data: at least `BUSY` of a core over a window of `WINDOW_S` or more). A hung pod
    does none of these: its workers sit idle inside a collective (measured: under 0.5% of a
    core, at most 20 ms in any second) and none gets to its next step."""

    BUSY, WINDOW_S = 0.05, 2.0

    def __init__(self, heartbeats: list[Path]) -> None:
        self.heartbeats = heartbeats
        self.steps: list[int | None] = [None] * len(heartbeats)  # each worker's last step
        self._seen: list[tuple[int, int, str] | None] = [None] * len(heartbeats)
        self._cpu: dict[int, float] = {}
        self._last = self._looked = time.monotonic()

    def output(self) -> None:
        self._last = time.monotonic()

    def idle_s(self, pids: list[int]) -> float:
        """Seconds since the last progress, after reading the heartbeats and the CPU time of
        the live workers `pids`."""
        now = time.monotonic()
        for i, path in enumerate(self.heartbeats):
            try:
                st = path.stat()
                seen = (st.st_ino, st.st_mtime_ns, path.read_text())
            except OSError:
                continue
            if seen != self._seen[i]:
                self._seen[i], self._last = seen, now
                if seen[2].isdigit():
                    self.steps[i] = int(seen[2])
        if now - self._looked >= self.WINDOW_S:
            for pid in pids:
                cpu = _cpu_seconds(pid)
                if cpu is None:
                    continue
                if cpu - self._cpu.get(pid, cpu) >= self.BUSY * (now - self._looked):
                    self._last = now
                self._cpu[pid] = cpu
            self._looked = now
        return now - self._last

    def position(self) -> str:
        done = [s for s in self.steps if s is not None]
        return f"after global step {max(done)}" if done else "before its first step"


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process `pid` has used, or None where /proc can't tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _dump_and_stop(procs: list[subprocess.Popen], stacks: list[Path]) -> None:
    """SIGUSR1 every live worker (faulthandler writes its stacks), wait for the dumps to settle
    (at most 5 s), then SIGKILL every worker and reap it."""
    live = [i for i, p in enumerate(procs) if p.poll() is None]
    for i in live:
        procs[i].send_signal(signal.SIGUSR1)
    deadline, sizes = time.monotonic() + 5.0, None
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = [stacks[i].stat().st_size if stacks[i].exists() else 0 for i in live]
        if all(now) and now == sizes:
            break
        sizes = now
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _write_stacks(path: Path, stacks: list[Path], procs: list[subprocess.Popen],
                  progress: _Progress, header: str) -> Path:
    """Every worker's dumped stacks in one file at `path` (or a temp file if it can't be
    written there); returns where they went."""
    parts = [f"# {header}\n"]
    for i, (dump, p) in enumerate(zip(stacks, procs, strict=True)):
        step = progress.steps[i]
        text = dump.read_text(errors="replace") if dump.exists() else ""
        parts.append(f"\n# process {i} (pid {p.pid}), last global step "
                     f"{'none' if step is None else step}\n"
                     f"{text or '(no stacks: the worker had not armed its dump yet)'}\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(parts))
    except OSError:
        fd, name = tempfile.mkstemp(prefix="phased-pod-stacks-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(parts))
        path = Path(name)
    return path


def _die_with_parent() -> None:
    """In a worker, before exec: SIGKILL it when the launcher dies (Linux), so a killed local
    pod leaves no worker waiting forever on a collective."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _without_device_count(xla_flags: str) -> str:
    """The launcher's XLA_FLAGS for a worker, less a fake device count (a worker's comes from
    ENV_LOCAL_DEVICES); the user's other flags (dumps, optimisation level) go on."""
    return " ".join(f for f in xla_flags.split()
                    if not f.startswith("--xla_force_host_platform_device_count"))


def _forward_sigterm(procs: list[subprocess.Popen]) -> Callable[[], None]:
    """Until the returned function is called, a SIGTERM to the launcher goes on to every live
    worker (which saves at the agreed step and exits `PREEMPTED_EXIT`) instead of killing the
    launcher, whose death would SIGKILL them. A signal to the whole process group (as a TPU
    host's) reaches each worker twice: one notice."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum: int, frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def launch_local_pod(num_processes: int, command: list[str], devices_per_process: int,
                     watchdog_s: float = 300.0, stacks_path: str | Path | None = None,
                     name: str = "phased-jax train") -> int:
    """Run `command` as `num_processes` local processes of one JAX run; return the worst exit code.

    If one process fails the others are killed, so a broken pod never hangs on a collective.
    A SIGTERM to the launcher goes on to the workers (`_forward_sigterm`); workers that stop for
    it exit `preemption.PREEMPTED_EXIT` together, which is no failure.
    A watchdog covers a pod that stops without failing (a hung collective): when no worker has
    made progress (`_Progress`) for `watchdog_s` seconds (0: no watchdog), every worker's Python
    stacks go to `stacks_path` (default: a temp file), every worker is killed, and one line on
    stderr names the last global step and the file; the exit code is then `WATCHDOG_EXIT`.
    """
    coordinator = f"127.0.0.1:{_free_port()}"
    procs: list[subprocess.Popen] = []
    forward = _forward_sigterm(procs)  # before the first worker starts
    try:
        with tempfile.TemporaryDirectory(prefix="phased-pod-") as tmp:
            return _run_pod(procs, Path(tmp), coordinator, num_processes, command,
                            devices_per_process, watchdog_s, stacks_path, name)
    finally:
        forward()


def _run_pod(procs: list[subprocess.Popen], tmp: Path, coordinator: str, num_processes: int,
             command: list[str], devices_per_process: int, watchdog_s: float,
             stacks_path: str | Path | None, name: str) -> int:
    heartbeats = [tmp / f"heartbeat{i}" for i in range(num_processes)]
    stacks = [tmp / f"stacks{i}.txt" for i in range(num_processes)]
    progress = _Progress(heartbeats)
    for pid in range(num_processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
                    ENV_PROCESS_ID: str(pid), ENV_LOCAL_DEVICES: str(devices_per_process),
                    ENV_HEARTBEAT: str(heartbeats[pid]), ENV_STACKS: str(stacks[pid])})
        env["XLA_FLAGS"] = _without_device_count(env.get("XLA_FLAGS", ""))
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      preexec_fn=_die_with_parent))
    relays = [threading.Thread(target=_relay, daemon=True,
                               args=(p.stdout, f"[process {i}] ", progress.output))
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
            if codes[i] not in (0, preemption.PREEMPTED_EXIT):  # preempted ones stop together
                for q in procs:
                    if q.poll() is None:
                        q.kill()  # not SIGTERM: to a worker, that is a preemption notice
        live = [p.pid for p in procs if p.poll() is None]
        if live and watchdog_s > 0 and progress.idle_s(live) > watchdog_s:
            _dump_and_stop(procs, stacks)
            for t in relays:
                t.join(timeout=5)
            where = Path(stacks_path) if stacks_path else Path(
                tempfile.gettempdir(), f"phased-pod-stacks-{os.getpid()}.txt")
            stalled = f"made no progress for {watchdog_s:g} s {progress.position()}"
            where = _write_stacks(where, stacks, procs, progress, f"the local pod {stalled}")
            print(f"{name}: error: the local pod {stalled}; stopped every worker; their "
                  f"Python stacks are in {where}", file=sys.stderr, flush=True)
            return WATCHDOG_EXIT
    for t in relays:
        t.join(timeout=5)
    return max(codes.values(), key=abs)
