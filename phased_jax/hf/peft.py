"""LoRA adapters in PEFT's format, and merged into the base: the files users exchange.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with one
`lora_A.weight` [r, in] and `lora_B.weight` [out, r] per adapted module and layer, named
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` and so on. Ours are stacked
over layers and laid out as the base weight they adapt (`phased_jax.model.lora.shapes`); the
conversion is a transpose and a reshape each way, so a round trip is exact.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from phased_jax.atomic_dir import atomic_directory
from phased_jax.model.config import ModelConfig
from phased_jax.model.lora import MODULES, TARGETS, LoraSpec, shapes
from phased_jax.model.lora import merge as lora_merge

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MERGED_FIRST = "merged_first.json"  # ours, beside PEFT's files (`save_adapter`)
PREFIX = "base_model.model.model.layers.{i}."
_PARENT = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp",
           "down": "mlp"}
# PEFT settings this reader refuses: what it means, when the setting is not its default
UNSUPPORTED = {"use_dora": "DoRA", "use_rslora": "rsLoRA (alpha / sqrt(r) scaling)",
               "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
               "layers_to_transform": "layers_to_transform (adapters on some layers only)",
               "modules_to_save": "modules_to_save (fully trained extra modules)",
               "rank_pattern": "rank_pattern (per-module ranks)",
               "alpha_pattern": "alpha_pattern (per-module alphas)"}


class AdapterError(ValueError):
    """An adapter directory this reader cannot use; the message names the file and the field."""


def adapter_complete(directory: str | Path) -> bool:
    """Whether `directory` holds a whole PEFT adapter (it is written as one atomic directory,
    so both files present means both are complete)."""
    d = Path(directory)
    return (d / ADAPTER_CONFIG).is_file() and (d / ADAPTER_WEIGHTS).is_file()


def adapter_path(target: str) -> tuple[str, str]:
    """Where a target's adapter lives in our params under `layers`: (module, adapter name)."""
    return _PARENT[target], f"lora_{target}"


def to_peft(cfg: ModelConfig, spec: LoraSpec, params: dict) -> dict[str, np.ndarray]:
    """PEFT's tensors of our params' adapters (host float32)."""
    out = {}
    r = spec.rank
    for t in spec.targets:
        module, name = adapter_path(t)
        a_all = np.asarray(params["layers"][module][name]["a"], np.float32)
        b_all = np.asarray(params["layers"][module][name]["b"], np.float32)
        for i in range(cfg.num_layers):
            key = PREFIX.format(i=i) + MODULES[t]
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a_all[i].reshape(-1, r).T)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_all[i].reshape(r, -1).T)
    return out


def from_peft(cfg: ModelConfig, spec: LoraSpec, tensors: dict[str, np.ndarray],
              source: str = "the adapter") -> dict:
    """Our adapter params ({"layers": {module: {lora_t: {a, b}}}}, float32) from PEFT's tensors;
    AdapterError naming the tensor that is missing or has the wrong shape."""
    layers: dict[str, dict] = {}
    r = spec.rank
    for t in spec.targets:
        (a_shape, _), (b_shape, _) = shapes(cfg, t, r)
        a_layers, b_layers = [], []
        for i in range(cfg.num_layers):
            key = PREFIX.format(i=i) + MODULES[t]
            for part, want, layers_out, ours in (("A", (r, int(np.prod(a_shape[:-1]))), a_layers,
                                                  a_shape),
                                                 ("B", (int(np.prod(b_shape[1:])), r), b_layers,
                                                  b_shape)):
                name = f"{key}.lora_{part}.weight"
                if name not in tensors:
                    raise AdapterError(f"{source}: no tensor {name} (the adapter's config names "
                                       f"{MODULES[t]} as a target)")
                x = np.asarray(tensors[name], np.float32)
                if x.shape != want:
                    raise AdapterError(f"{source}: {name} has shape {x.shape}, expected {want} "
                                       f"for r={r} on this model")
                layers_out.append(x.T.reshape(ours))
        module, adapter = adapter_path(t)
        layers.setdefault(module, {})[adapter] = {"a": np.stack(a_layers), "b": np.stack(b_layers)}
    return {"layers": layers}


def adapter_config(spec: LoraSpec, base: str = "") -> dict[str, Any]:
    """`adapter_config.json` for `spec` (PEFT's LoraConfig fields)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": [MODULES[t].split(".")[-1] for t in spec.targets],
            "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def spec_from_config(config: dict[str, Any], source: str = ADAPTER_CONFIG) -> LoraSpec:
    """The LoraSpec of a PEFT `adapter_config.json`; AdapterError naming a feature we lack."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{source}: peft_type {config.get('peft_type')!r} is not LORA")
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise AdapterError(f"{source}: {field}={config[field]!r}: {what} is not supported; "
                               "train or export the adapter without it")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{source}: bias={config['bias']!r}: adapters with trained biases "
                           "are not supported (the model has no biases); use bias='none'")
    modules = config.get("target_modules") or []
    if isinstance(modules, str):
        raise AdapterError(f"{source}: target_modules is a regex ({modules!r}); list the "
                           "modules (q_proj, k_proj, ...) instead")
    by_leaf = {MODULES[t].split(".")[-1]: t for t in TARGETS}
    unknown = [m for m in modules if m.split(".")[-1] not in by_leaf]
    if unknown or not modules:
        raise AdapterError(f"{source}: target_modules {modules!r}: "
                           + (f"{unknown[0]!r} is not one of " if unknown else "empty; use ")
                           + ", ".join(by_leaf))
    targets = tuple(t for t in TARGETS if MODULES[t].split(".")[-1] in
                    {m.split(".")[-1] for m in modules})
    return LoraSpec(int(config["r"]), float(config["lora_alpha"]), targets,
                    float(config.get("lora_dropout", 0.0)))


def save_adapter(directory: str | Path, cfg: ModelConfig, spec: LoraSpec, params: dict,
                 base: str = "", merged_first: Sequence[str] = ()) -> Path:
    """Write a PEFT adapter directory (whole or not at all). `merged_first`: the adapters
    (directories beside this one) a `merge_each_phase` run merged into the base, in order,
    before training this one (`MERGED_FIRST`, which `merged_first` reads back)."""
    with atomic_directory(Path(directory), overwrite=True) as tmp:
        save_file(to_peft(cfg, spec, params), str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(spec, base), indent=2) + "\n")
        if merged_first:
            (tmp / MERGED_FIRST).write_text(json.dumps({"merged_first": list(merged_first)},
                                                       indent=2) + "\n")
    return Path(directory)


def merged_first(directory: str | Path) -> list[Path]:
    """The adapters to merge into the base, in order, before this one goes on it: none for an
    adapter of the base itself; for a phase of a `merge_each_phase` run, the earlier phases'."""
    path = Path(directory, MERGED_FIRST)
    if not path.is_file():
        return []
    try:
        names = json.loads(path.read_text())["merged_first"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{path}: unreadable ({e}); it lists the adapters merged before "
                           "this one: restore it from the run, or retrain") from None
    return [Path(directory).parent / str(n) for n in names]


def load_adapter(directory: str | Path, cfg: ModelConfig) -> tuple[LoraSpec, dict]:
    """(spec, adapter params) of a PEFT adapter directory, checked against `cfg`."""
    d = Path(directory)
    try:
        config = json.loads((d / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{d}: no {ADAPTER_CONFIG}, so not a PEFT adapter directory") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{d / ADAPTER_CONFIG}: not JSON ({e})") from None
    spec = spec_from_config(config, str(d / ADAPTER_CONFIG))
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{d}: no {ADAPTER_WEIGHTS} (a .bin adapter: save it with "
                           "safe_serialization=True)")
    return spec, from_peft(cfg, spec, load_file(str(weights)), str(weights))


def merge(cfg: ModelConfig, spec: LoraSpec, base: dict, adapters: dict) -> dict:
    """Base params with each adapter's update merged in (host float32): what PEFT's
    `merge_and_unload()` gives, in our layout (`phased_jax.model.lora.merge`)."""
    f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), base)
    return jax.tree.map(np.asarray, lora_merge(cfg, spec, f32, adapters))
