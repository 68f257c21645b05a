"""Run checkpoints: one Orbax manager, one step = train state + run metadata.

Steps are global (counted across phases), so the manager's ordering is the run's ordering.
A phase-end step is preserved for good (the preservation policy is told every phase-end step
up front, since phase lengths are fixed by the data before training starts); other steps
roll over `keep`. The metadata (phase index, step in phase, config) is what makes resume
exact: the data loader is indexed by step, so no iterator state is needed.

Restore never destroys a run. Before touching anything it tells three cases apart:
- the checkpoint does not fit this config (tree, shapes): a `ConfigError` naming the config
  fields that differ from the checkpoint's saved config; nothing is moved;
- it cannot be read right now (I/O error, time-out): retried with backoff, then a
  `CheckpointError`; nothing is moved;
- its own files prove it corrupt (commit marker, metadata or array data missing or truncated):
  only then it is set aside under a fresh `<step>.corrupt[.N]` name and the one before is used.
  But when no checkpoint of several reads, the likelier cause is the storage (a mount down: every
  file "missing"): the run stops with nothing moved, unless `on_unreadable="restart"`.
On several hosts every process reads its own shards, they retry and decide together (any
process's proof of corruption counts), and only process 0 moves files.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from phased_jax import distributed, io_errors
from phased_jax.errors import CheckpointError, ConfigError, exception_chain

log = logging.getLogger(__name__)

# Files every finished step of ours has; one missing means the step never finished writing.
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt",
                  "meta/metadata")
# Errors from storage that say nothing about the checkpoint itself: retry, never move.
TRANSIENT_ERRNOS = (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EBUSY,
                    errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNREFUSED, errno.EHOSTUNREACH)
# How a damaged array file reads back through tensorstore (its errors start with the status
# code): a truncated, garbled or missing chunk. UNAVAILABLE or DEADLINE_EXCEEDED are storage.
CORRUPTION_MARKERS = ("DATA_LOSS:", "OUT_OF_RANGE:", "NOT_FOUND:")

_sleep = time.sleep  # tests replace it to act during a backoff


class RunCheckpoints:
    """Saves and restores `(state, meta)` pairs under `directory/<global step>/`."""

    def __init__(self, directory: str, *, keep: int, phase_end_steps: Sequence[int] = (),
                 async_save: bool = True, restore_retries: int = 3, retry_backoff_s: float = 1.0,
                 on_unreadable: str = "stop"):
        self.directory = epath.Path(directory)
        self._restart = on_unreadable == "restart"
        self._keep, self._async = keep, async_save
        self._retries, self._backoff = max(0, int(restore_retries)), float(retry_backoff_s)
        self._phase_end_steps = sorted(set(int(s) for s in phase_end_steps))
        self._manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(max(1, self._keep)),
            ocp.checkpoint_managers.CustomSteps(self._phase_end_steps),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=self._async,
            create=True,
            cleanup_tmp_directories=True,  # a save a kill interrupted is not a checkpoint
        )
        return ocp.CheckpointManager(self.directory, options=options,
                                     item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving (asynchronously when enabled); the state must not be donated until then."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state: Any, config_json: str
                       ) -> tuple[Any, dict[str, Any]] | None:
        """The newest usable checkpoint restored onto `abstract_state`, or None if there is none.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings, so a checkpoint
        written on one mesh restores onto another. `config_json` (this run's config) names the
        fields to blame when the checkpoint's tree does not fit.
        """
        self._manager.wait_until_finished()
        corrupt: list[tuple[int, str]] = []  # newest first: (step, what its files prove)
        for step in sorted(self._manager.all_steps(), reverse=True):
            restored, problem = self._restore_step(step, abstract_state, config_json)
            if restored is not None:
                for bad, why in corrupt:
                    self._set_aside(bad, why, "using the one before it")
                return restored
            corrupt.append((step, problem))
        if len(corrupt) > 1 and not self._restart:
            raise CheckpointError(
                f"none of the {len(corrupt)} checkpoints in {self.directory} could be read "
                f"(checkpoint {corrupt[0][0]}: {corrupt[0][1]}); this looks like the storage, "
                "not the checkpoints: nothing was moved; check the mount and rerun "
                "(checkpoint.on_unreadable=restart sets them aside and starts over)")
        for bad, why in corrupt:
            self._set_aside(bad, why, "starting over from step 0" if bad == corrupt[-1][0]
                            else "trying the one before it")
        if len(corrupt) > 1 and jax.process_index() == 0:
            print(f"checkpoint.on_unreadable=restart: none of the {len(corrupt)} checkpoints "
                  f"could be read; all set aside, starting over from step 0", flush=True)
        return None

    # -- one step --------------------------------------------------------------------------------
    def _restore_step(self, step: int, abstract_state: Any, config_json: str
                      ) -> tuple[tuple[Any, dict[str, Any]] | None, str]:
        """(the restored state and meta, "") or (None, what proves the step corrupt); raises
        when it cannot be read and nothing proves it corrupt (the storage is failing)."""
        path = self.directory / str(step)
        error: BaseException | None = None  # this process's last failure (None: it read fine)
        for attempt in range(self._retries + 1):
            if attempt:
                _sleep(self._backoff * 2 ** (attempt - 1))
            error = None
            try:
                meta, tree = self._read_metadata(path)
                _check_fits(path, tree, abstract_state, meta.get("config"), config_json)
                state = _read_state(path, abstract_state)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below, after the retries
                error = e
                io_errors.quiet_failed_read_echoes()
            if distributed.all_ok(error is None):
                _note_casts(path, tree, abstract_state)
                return (state, meta), ""
        # Any process's proof is enough: each read only its own shards of the array data.
        local = (integrity_problem(path) or _corruption_in(error)) if error else ""
        problem = next((v for v in distributed.gather_texts(local) if v), "")
        if not problem:
            texts = distributed.gather_texts(_describe(error) if error else "")
            reasons = "; ".join(f"process {i}: {t}" if len(texts) > 1 else t
                                for i, t in enumerate(texts) if t)
            raise CheckpointError(
                f"cannot read checkpoint {path} after {self._retries + 1} tries "
                f"({reasons}); its files look complete, so the storage is failing "
                "or unreachable: check it and rerun (nothing was moved; raise "
                "checkpoint.restore_retries to wait longer)") from error
        return None, problem

    @staticmethod
    def _read_metadata(path: epath.Path) -> tuple[dict[str, Any], Any]:
        meta = json.loads((path / "meta" / "metadata").read_text())
        tree = ocp.StandardCheckpointHandler().metadata(path / "state")
        return meta, getattr(tree, "item_metadata", tree)

    def _set_aside(self, step: int, problem: str, then: str) -> None:
        path = self.directory / str(step)
        aside = _fresh_name(self.directory, f"{step}.corrupt")
        message = f"checkpoint {path} is corrupt ({problem}); moved to {aside}, {then}"
        if jax.process_index() == 0:
            log.warning(message)
            print(f"warning: {message}", flush=True)
            try:
                path.rename(aside)
            except OSError as e:
                raise CheckpointError(f"cannot move corrupt checkpoint {path} aside: {e}") from e
        distributed.barrier(f"phased_jax_set_aside_{step}")
        self._manager.close()
        self._manager = self._make_manager()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _read_state(path: epath.Path, abstract_state: Any) -> Any:
    """This process's shards of the state, read with no cross-process barrier inside: a read
    that fails on one host only must not leave the others waiting in Orbax's barrier (the
    processes agree on the outcome afterwards, in `distributed.all_ok`)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.restore(path / "state", args=ocp.args.StandardRestore(abstract_state))
    finally:
        handler.close()


# -- what a step's own files say ----------------------------------------------------------------
def integrity_problem(path: epath.Path) -> str:
    """Why the step at `path` is provably incomplete or corrupt, or "" if its files look whole."""
    for name in REQUIRED_FILES:
        if not (path / name).exists():
            return f"{name} is missing"
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata"):
        try:
            json.loads((path / name).read_text())
        except ValueError as e:
            return f"{name} is not valid JSON ({e})"
    for item in ("state", "meta"):
        marker = path / item / "commit_success.txt"
        if (path / "commit_success.txt").exists() and not marker.exists():
            return f"{item}/commit_success.txt is missing"
    return ""


def _corruption_in(error: BaseException) -> str:
    """A description if `error` (or its cause) says array data is damaged, else ""."""
    for e in exception_chain(error):
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return ""
        if isinstance(e, ValueError) and str(e).startswith(CORRUPTION_MARKERS):
            return f"its array data does not read back: {_describe(e)}"
    return ""


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def _fresh_name(directory: epath.Path, base: str) -> epath.Path:
    """`directory/base`, or `base.1`, `base.2`, ...: an earlier set-aside copy is never replaced."""
    candidate, n = directory / base, 0
    while candidate.exists():
        n += 1
        candidate = directory / f"{base}.{n}"
    return candidate


# -- does the checkpoint fit this config ------------------------------------------------------
def _path_key(path: tuple) -> tuple[str, ...]:
    """A tree path as plain strings, the same for Orbax's metadata tree and a live pytree."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _leaves(tree: Any) -> dict[tuple[str, ...], Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_key(p): v for p, v in flat if hasattr(v, "shape")}


def tree_difference(saved: Any, wanted: Any) -> str:
    """The first way the saved tree's entries or shapes differ from `wanted`'s, or ""."""
    a, b = _leaves(saved), _leaves(wanted)
    for key in sorted(set(a) | set(b)):
        name = "/".join(key)
        if key not in a:
            return f"this config has {name} {tuple(b[key].shape)}, the checkpoint does not"
        if key not in b:
            return f"the checkpoint has {name} {tuple(a[key].shape)}, this config does not"
        if tuple(a[key].shape) != tuple(b[key].shape):
            return f"{name} is {tuple(a[key].shape)} there, {tuple(b[key].shape)} here"
    return ""


def config_difference(saved_json: str | None, config_json: str, limit: int = 8) -> list[str]:
    """`field: checkpoint value -> this value` for every config field that differs."""
    if not saved_json:
        return []
    a, b = _flatten(json.loads(saved_json)), _flatten(json.loads(config_json))
    diffs = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_fits(path: epath.Path, tree: Any, abstract_state: Any, saved_json: str | None,
                config_json: str) -> None:
    difference = tree_difference(tree, abstract_state)
    if not difference:
        return
    fields = config_difference(saved_json, config_json)
    blame = ("the config fields that differ (checkpoint -> this run): " + "; ".join(fields)
             if fields else "the config is unchanged, so the code's train state changed")
    raise ConfigError(f"checkpoint {path} does not fit this config ({difference}); {blame}. "
                      "Revert the change to resume, or use a new output_dir (or "
                      "checkpoint.dir) to start over; nothing was moved")


def _note_casts(path: epath.Path, tree: Any, abstract_state: Any) -> None:
    a, b = _leaves(tree), _leaves(abstract_state)
    casts = sorted({(str(a[k].dtype), str(b[k].dtype)) for k in a
                    if k in b and str(a[k].dtype) != str(b[k].dtype)})
    if casts and jax.process_index() == 0:
        pairs = ", ".join(f"{x} -> {y}" for x, y in casts)
        print(f"note: checkpoint {path} is cast on restore ({pairs}), as this config asks",
              flush=True)
