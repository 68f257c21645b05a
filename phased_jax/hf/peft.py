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
from phased_jax.model.lora import MODULES, TARGETS, LoraSpec, shapes, slot

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
    """Base params (host numpy, float32 or bfloat16) with each adapter's update merged in, in
    the base's dtype: bit for bit what PEFT's `merge_and_unload()` gives on a model loaded in
    that dtype, in our layout (the slices `phased_jax.model.lora.merge` adds to).

    PEFT computes `W + (B @ A) * scale`: torch's float32 `B @ A` (a CPU kernel summing the r
    products of each element in order, each with one fused multiply-add: `_lora_product`), the
    product times the float32 scale, then added to the weight in float32 and rounded once into
    its dtype. Each step is done here in numpy in that order (not jax: XLA's matmul sums r in
    another order, so a few % of elements end a rounding of the update apart, and it may fuse
    the scaling into the add); the jax merge, for params on devices, stays a matmul, within a
    rounding of the sum. One layer's [in, out] update at a time (a few hundred MB beside the
    weights for 7B), vectorised but for a loop over r: minutes for a 7B model at r = 16."""
    out = jax.tree.map(np.asarray, base)  # no copy of what is already on the host
    layers = out["layers"] = {m: dict(v) for m, v in out["layers"].items()}
    scale = np.float32(spec.scale)
    copied: set[str] = set()
    for t in spec.targets:
        module, name, sl = slot(cfg, t)
        if name not in copied:  # ours to write into; the base stays as it was
            layers[module][name] = np.array(layers[module][name])
            copied.add(name)
        w = layers[module][name]
        ad = adapters["layers"][module][f"lora_{t}"]
        a_all, b_all = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
        r = spec.rank
        for i in range(a_all.shape[0]):
            delta = _lora_product(a_all[i].reshape(-1, r), b_all[i].reshape(r, -1))
            np.multiply(delta, scale, out=delta)
            wl = w[i]
            target = wl[sl]
            wl[sl] = (target.astype(np.float32) + delta.reshape(target.shape)).astype(w.dtype)
    return out


def _lora_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [in, r] @ b [r, out] (float32) as torch's CPU matmul computes `lora_B @ lora_A`: for
    each element, acc = +0 then acc = fma(a_k, b_k, acc) for k = 0..r-1, rounded to float32 at
    each step. The fma in float64: the product of two float32 is exact there, and the sum is
    rounded to float64 then to float32; where that double rounding could differ from fma's one
    rounding (the float64 sum exactly halfway between two float32, and inexact), the sum is
    moved one float64 ulp towards the exact value first. Numpy over row blocks (cache-sized),
    a Python loop over r."""
    n_in, r = a.shape
    n_out = b.shape[1]
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    out = np.zeros((n_in, n_out), np.float32)
    rows = max(1, (1 << 16) // max(n_out, 1))
    s = np.empty((rows, n_out), np.float64)
    low = np.empty((rows, n_out), np.uint64)
    for i0 in range(0, n_in, rows):
        i1 = min(n_in, i0 + rows)
        acc, sb, lb = out[i0:i1], s[: i1 - i0], low[: i1 - i0]
        for k in range(r):
            p = a64[i0:i1, k:k + 1]
            np.multiply(p, b64[k], out=sb)  # exact
            np.add(sb, acc, out=sb)
            # float64 values halfway between two float32: the low 29 of 52 fraction bits 1000...
            np.bitwise_and(sb.view(np.uint64), np.uint64(0x1FFFFFFF), out=lb)
            half = lb == np.uint64(0x10000000)
            if half.any():
                ri, ci = np.nonzero(half)
                x, y, h = p[ri, 0] * b64[k, ci], acc[ri, ci].astype(np.float64), sb[ri, ci]
                v = h - x  # TwoSum: the exact x + y is h + err
                err = (x - (h - v)) + (y - v)
                sb[ri, ci] = np.where(err == 0, h, np.nextafter(h, np.where(err > 0, np.inf,
                                                                           -np.inf)))
            acc[...] = sb
    return out
