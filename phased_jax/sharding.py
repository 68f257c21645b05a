"""The device mesh and the one logical->mesh rule table.

The model names only logical axes (`embed`, `heads`, `batch`, ...); `config.mesh.rules` maps
them onto the mesh axes (`data`, `fsdp`, `tensor`). Parameters, optimizer state, batches and
activation constraints all go through `logical_to_mesh_spec`, so changing the table re-shards
everything and nothing else needs to know a mesh axis name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from phased_jax.errors import ConfigError
from phased_jax.model.config import ModelConfig
from phased_jax.model.lora import LoraSpec
from phased_jax.model.params import abstract_params, logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]


def rules_from_config(mesh_cfg: ConfigDict) -> Rules:
    """The rule table as flax expects it: ((logical, mesh axis | tuple | None), ...)."""
    rules = []
    for entry in mesh_cfg.rules:
        if len(entry) != 2:
            raise ConfigError(f"config.mesh.rules entry {entry!r} is not (logical_name, mesh_axes)")
        name, target = entry
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ConfigError(f"config.mesh.rules: {name!r} maps to unknown mesh axes {bad}; "
                              f"mesh axes are {MESH_AXES}")
        rules.append((name, tuple(target) if isinstance(target, list | tuple) else target))
    return tuple(rules)


def resolve_mesh_shape(shape: Sequence[int], dcn_shape: Sequence[int], num_devices: int
                       ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-slice and across-slice shapes with the one `-1` of the per-slice shape filled in."""
    shape, dcn_shape = tuple(int(s) for s in shape), tuple(int(s) for s in dcn_shape)
    if len(shape) != 3 or len(dcn_shape) != 3:
        raise ConfigError(f"config.mesh.shape {shape} and dcn_shape {dcn_shape} need 3 entries "
                          f"each, for the axes {MESH_AXES}")
    if any(s < 1 for s in dcn_shape):
        raise ConfigError(f"config.mesh.dcn_shape {dcn_shape} must be positive")
    slices = math.prod(dcn_shape)
    if num_devices % slices:
        raise ConfigError(f"{num_devices} devices do not split into {slices} slices "
                          f"(config.mesh.dcn_shape={dcn_shape})")
    per_slice = num_devices // slices
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"config.mesh.shape {shape}: positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if per_slice % known:
            raise ConfigError(f"config.mesh.shape {shape}: {per_slice} devices per slice are not "
                              f"a multiple of {known}, so -1 cannot be inferred")
        shape = tuple(per_slice // known if s == -1 else s for s in shape)
    if math.prod(shape) != per_slice:
        raise ConfigError(f"config.mesh.shape {shape} holds {math.prod(shape)} devices but each of "
                          f"the {slices} slice(s) has {per_slice} (total devices {num_devices}); "
                          f"use -1 for one axis to infer it")
    return shape, dcn_shape


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where arrays live: a mesh and the logical-axis rule table that maps names onto it."""

    mesh: Mesh
    rules: Rules

    @classmethod
    def from_config(cls, mesh_cfg: ConfigDict, devices: Sequence[Any] | None = None
                    ) -> Placement:
        """The mesh a config's `mesh` section describes, over `devices` (default: all)."""
        return cls(make_mesh(mesh_cfg, devices), rules_from_config(mesh_cfg))

    @property
    def batch_shards(self) -> int:
        """How many ways the batch is split (the mesh axes the `batch` rule names)."""
        return batch_shards(self.mesh, self.rules)

    @property
    def batch_sharding(self) -> NamedSharding:
        return batch_sharding(self.mesh, self.rules)

    def put_batch(self, x: np.ndarray) -> jax.Array:
        """A global batch array from the whole batch every process holds (each device takes
        its slice; unlike training's batches, which each host builds only its rows of)."""
        return jax.make_array_from_callback(x.shape, self.batch_sharding, lambda index: x[index])


def mesh_sizes(mesh_cfg: ConfigDict, num_devices: int) -> dict[str, int]:
    """{axis: size} of the whole mesh a `mesh` section gives on `num_devices` devices."""
    shape, dcn_shape = resolve_mesh_shape(mesh_cfg.shape, mesh_cfg.dcn_shape, num_devices)
    return {a: s * d for a, s, d in zip(MESH_AXES, shape, dcn_shape, strict=True)}


def make_mesh(mesh_cfg: ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh (data, fsdp, tensor): per-slice (ICI) shape times across-slice (DCN) shape."""
    devices = list(devices if devices is not None else jax.devices())
    shape, dcn_shape = resolve_mesh_shape(mesh_cfg.shape, mesh_cfg.dcn_shape, len(devices))
    full = tuple(mesh_sizes(mesh_cfg, len(devices)).values())
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices != math.prod(dcn_shape) and slices > 1:
        raise ConfigError(f"the devices span {slices} slices but config.mesh.dcn_shape="
                          f"{dcn_shape} spans {math.prod(dcn_shape)}; set e.g. "
                          f"--config.mesh.dcn_shape='({slices},1,1)' (data parallel over DCN)")
    # Auto axis types: JAX 0.10 defaults make_mesh to explicit axes (see DESIGN.md).
    auto = (AxisType.Auto,) * 3
    if math.prod(dcn_shape) > 1 and hasattr(devices[0], "slice_index"):
        grid = mesh_utils.create_hybrid_device_mesh(shape, dcn_shape, devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if math.prod(dcn_shape) > 1:  # no slices here (CPU tests): slice-major order of devices
        grid = np.array(devices).reshape(dcn_shape + shape).transpose(0, 3, 1, 4, 2, 5)
        return Mesh(grid.reshape(full), MESH_AXES, axis_types=auto)
    try:
        return jax.make_mesh(full, MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        # A mesh axis that is no product of whole torus axes (tensor 8 on v5p-128's 4x4x4):
        # let it span part of a physical axis, as MaxText does, rather than refuse the shape.
        grid = mesh_utils.create_device_mesh(full, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def mesh_axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def logical_to_mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                         rules: Rules, mesh: Mesh | Mapping[str, int]) -> PartitionSpec:
    """Mesh PartitionSpec for one array; a dim the mesh axes do not divide is replicated.

    Replicating (rather than failing) keeps odd shapes usable, e.g. 8 kv heads on tensor=16;
    `plan` reports per-device bytes through this same function, so it shows the cost.
    """
    if logical is None:
        return PartitionSpec()
    sizes = mesh_axis_sizes(mesh)
    out = []
    for dim, axes in zip(shape, nn.logical_to_mesh_axes(tuple(logical), rules), strict=True):
        names = rule_axes(axes, sizes)
        if names and dim % math.prod(sizes[n] for n in names) == 0:
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    return PartitionSpec(*out)


def rule_axes(axes: str | Sequence[str] | None, sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes a rule's target names that span more than one device (a size-1 axis
    shards nothing)."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(n for n in names if sizes.get(n, 1) > 1)


def param_shardings(cfg: ModelConfig, placement: Placement, lora: LoraSpec | None = None) -> Any:
    """NamedShardings of a model's params (with `lora`, and its adapters') on `placement`, from
    their logical axis names."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(placement.mesh, logical_to_mesh_spec(
            tuple(spec), x.shape, placement.rules, placement.mesh)),
        logical_axes(cfg, lora), abstract_params(cfg, lora),
        is_leaf=lambda s: isinstance(s, PartitionSpec))


def place_params(cfg: ModelConfig, params: Any, placement: Placement) -> Any:
    """`params` (boxed or not, anywhere) moved onto the placement as training shards them."""
    return jax.device_put(nn.meta.unbox(params), param_shardings(cfg, placement))


def per_device_shape(shape: Sequence[int], spec: PartitionSpec,
                     mesh: Mesh | Mapping[str, int]) -> tuple[int, ...]:
    """Shape of one device's shard (ceil-divided) for a mesh PartitionSpec."""
    sizes = mesh_axis_sizes(mesh)
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        out.append(-(-dim // math.prod(sizes[n] for n in names)) if names else dim)
    return tuple(out)


def batch_shards(mesh: Mesh | Mapping[str, int], rules: Rules) -> int:
    """How many ways the `batch` logical axis is split."""
    sizes = mesh_axis_sizes(mesh)
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    return math.prod(sizes[n] for n in rule_axes(axes, sizes))


def check_batch(global_batch: int, grad_accum: int, mesh: Mesh | Mapping[str, int],
                rules: Rules) -> None:
    """Raise a ConfigError unless each micro-batch splits evenly over the batch shards."""
    shards = batch_shards(mesh, rules)
    if grad_accum < 1 or global_batch % grad_accum:
        raise ConfigError(f"config.train.global_batch={global_batch} is not divisible by "
                          f"config.train.grad_accum={grad_accum}")
    micro = global_batch // grad_accum
    if micro % shards:
        raise ConfigError(f"micro-batch {micro} (global_batch {global_batch} / grad_accum "
                          f"{grad_accum}) does not divide over the {shards} batch shards of mesh "
                          f"{mesh_axis_sizes(mesh)}; change train.global_batch, train.grad_accum or mesh.shape")


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of every [batch, length] array of the batch dict."""
    return NamedSharding(mesh, PartitionSpec(nn.logical_to_mesh_axes(("batch",), rules)[0], None))
