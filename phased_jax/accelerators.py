"""Accelerators by name: memory and peak FLOP/s per device, and Cloud TPU slices as devices.

A Cloud TPU accelerator type (`v5p-16`, `v5litepod-8`, `v4-32`, `v6e-4`) names a slice; the
TPU compiler in `libtpu` can describe that slice's devices on a machine with no TPU
(`jax.experimental.topologies`), so a train step can be compiled for a pod before it is booked.
One JAX device is one chip: v4 and v5p chips join their two TensorCores (megacore), and their
accelerator types count TensorCores, so `v5p-16` is 8 chips; v5e and v6e types count chips.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from phased_jax.errors import UsageError

# name -> (memory per device in GiB, dense bf16 peak FLOP/s per device), from the spec sheets
DEVICES: dict[str, tuple[float, float]] = {
    "v4": (32, 275e12), "v5e": (16, 197e12), "v5p": (95, 459e12), "v6e": (32, 918e12),
    "a100-40gb": (40, 312e12), "a100-80gb": (80, 312e12), "h100": (80, 989e12),
    "h200": (141, 989e12),
}
GPU_KINDS = ("a100-40gb", "a100-80gb", "h100", "h200")  # the others in DEVICES are TPUs
# `jax.Device.device_kind` (lower-cased) substring -> DEVICES name; first match wins, so
# "v5 lite" is tested before "v5" (v5p reports "TPU v5").
DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("v5", "v5p"), ("v6 lite", "v6e"),
    ("v6e", "v6e"), ("v4", "v4"), ("h100", "h100"), ("h200", "h200"), ("a100", "a100-80gb"),
)


def device_name(device_kind: str) -> str | None:
    """The DEVICES name of a `jax.Device.device_kind`, or None for one not in the table."""
    kind = device_kind.lower()
    return next((name for key, name in DEVICE_KINDS if key in kind), None)

# generation -> (libtpu topology prefix, chip config, mesh dims, TensorCores counted per chip)
_TPU_GENERATIONS: dict[str, tuple[str, str, int, int]] = {
    "v4": ("v4", "megacore", 3, 2),
    "v5p": ("v5", "megacore", 3, 2),
    "v5e": ("v5e", "default", 2, 1),
    "v6e": ("v6e", "default", 2, 1),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
TPU_INSTALL_HINT = "pip install -e '.[tpu]'  (installs jax[tpu], whose libtpu holds the TPU compiler)"


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One slice of an accelerator type: its generation, chips and ICI topology."""

    name: str
    generation: str
    chips: int
    topology: tuple[int, ...]

    @property
    def hbm_gib(self) -> float:
        return DEVICES[self.generation][0]

    @property
    def peak_flops(self) -> float:
        return DEVICES[self.generation][1]

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU name of this slice (`v5p-16`), whatever form it was given in."""
        return f"{self.generation}-{self.chips * _TPU_GENERATIONS[self.generation][3]}"

    @property
    def topology_name(self) -> str:
        return f"{_TPU_GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.topology))}"


def _default_topology(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's slice shape for a power-of-two chip count: grow the smallest axis, last first
    (v5p-8: 2x2x1, v5p-16: 2x2x2, v5p-32: 2x2x4, v5p-64: 2x4x4; v5e-8: 2x4, v5e-32: 4x8)."""
    if chips < 4:
        return (1,) * (dims - 1) + (chips,) if dims == 2 else (1, 1, chips)
    shape = [2, 2] if dims == 2 else [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_tpu(name: str) -> TpuSlice:
    """`v5p-16` (Cloud TPU accelerator type) or `v5p:2x2x2` (explicit topology) -> TpuSlice."""
    m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in _TPU_GENERATIONS:
        raise UsageError(f"--tpu {name!r}: give an accelerator type as Cloud TPU names it "
                         f"(v4-N, v5litepod-N or v5e-N, v5p-N, v6e-N) or GEN:AxBxC "
                         f"(e.g. v5p:2x2x2)")
    _, _, dims, cores = _TPU_GENERATIONS[gen]
    if m.group(3):
        topology = tuple(int(d) for d in m.group(3).split("x"))
        if len(topology) != dims:
            raise UsageError(f"--tpu {name!r}: {gen} topologies have {dims} dimensions")
        return TpuSlice(name, gen, math.prod(topology), topology)
    count = int(m.group(2))
    chips, rest = divmod(count, cores)
    if rest or chips < 1 or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if cores == 2 else "chips"
        raise UsageError(f"--tpu {name!r}: {gen}-N counts {unit}; give a power-of-two slice such "
                         f"as {gen}-{4 * cores} or {gen}-{16 * cores}, or an explicit topology "
                         f"as {gen}:AxB{'xC' if dims == 3 else ''}")
    return TpuSlice(name, gen, chips, _default_topology(chips, dims))


def require_libtpu() -> None:
    """Raise a UsageError that says how to install libtpu when it is missing."""
    try:
        found = importlib.util.find_spec("libtpu") is not None
    except ImportError:
        found = False
    if not found:
        raise UsageError(f"compiling for TPU needs libtpu, which is not installed: "
                         f"{TPU_INSTALL_HINT}")


def tpu_devices(tpu: TpuSlice, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of `num_slices` slices of `tpu` (multi-slice devices carry
    `slice_index`, so the mesh's DCN axes map onto slices)."""
    require_libtpu()
    # libtpu looks for a TPU VM's metadata server and worker list; there is none here, and
    # without these it prints errors while it works.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.accelerator_type)
    # No chip to guard here: without this, a second process compiling at the same time fails
    # on libtpu's /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    _, chip_config, dims, _ = _TPU_GENERATIONS[tpu.generation]
    full = tpu.topology + ((1,) if dims == 2 else ())
    per_host = tuple(min(h, d) for h, d in zip((2, 2, 1), full, strict=True))  # 4 chips a host
    return list(topologies.get_topology_desc(
        platform="tpu", topology_name=tpu.topology_name, chip_config_name=chip_config,
        chips_per_host_bounds=per_host, num_slices=num_slices).devices)
