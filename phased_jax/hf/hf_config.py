"""Hugging Face `config.json` <-> our ModelConfig, refusing every field our decoder cannot honour.

A field we silently ignored would give a model that loads and then computes something else, so
anything our Llama/Mistral decoder does not compute (RoPE scaling other than linear, llama3
and yarn; biases; other activations; quantization) is an error that names the field. Tied
embeddings (`tie_word_embeddings`) are honoured: the model has no head of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phased_jax.errors import CheckpointError
from phased_jax.model import rope as rope_module
from phased_jax.model.config import ModelConfig

# HF class name -> our architecture name (and back).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
HF_CLASS = {v: k for k, v in ARCHITECTURES.items()}

# transformers' class defaults, used where config.json leaves a field out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "sliding_window": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_DTYPES = ("float32", "bfloat16", "float16")


# transformers' rope_type -> our rope_scaling, and the keys each may carry besides the
# always-allowed ones; everything else (dynamic, longrope, ...) is refused, naming the field.
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
_ROPE_KEYS = {
    "none": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"},
}
_ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                  "yarn": ("factor",)}
_ROPE_ALWAYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _rope_dict(rope: Any, field: str, d: dict[str, Any], where: str) -> dict[str, Any]:
    """Our rope_scaling* fields from one `rope_scaling` (transformers 4) or `rope_parameters`
    (transformers 5) dict, read as transformers' `modeling_rope_utils` reads it."""
    if not isinstance(rope, dict):
        raise CheckpointError(f"{where}: unsupported config field {field}={rope!r}; expected a dict")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise CheckpointError(
            f"{where}: unsupported {field}.rope_type={kind!r}; implemented rope types: "
            f"{sorted(_ROPE_TYPES)}")
    ours = _ROPE_TYPES[kind]
    unknown = sorted(set(rope) - _ROPE_ALWAYS - _ROPE_KEYS[ours])
    if unknown:
        raise CheckpointError(f"{where}: unsupported {field} keys {unknown} for rope_type={kind!r}")
    missing = [k for k in _ROPE_REQUIRED.get(ours, ()) if rope.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: {field} with rope_type={kind!r} needs {missing}")
    if rope.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise CheckpointError(f"{where}: unsupported {field}.partial_rotary_factor="
                              f"{rope['partial_rotary_factor']!r}; RoPE rotates the whole head")
    out: dict[str, Any] = {"rope_scaling": ours}
    if ours == "none":
        return out
    factor = out["rope_scaling_factor"] = float(rope["factor"])
    if ours in ("llama3", "yarn"):  # a top-level value wins in transformers 5, the dict's in 4
        inner, top = rope.get("original_max_position_embeddings"), d.get(
            "original_max_position_embeddings")
        if inner is not None and top is not None and int(inner) != int(top):
            raise CheckpointError(
                f"{where}: original_max_position_embeddings={top!r} disagrees with "
                f"{field}.original_max_position_embeddings={inner!r}")
        out["rope_scaling_original_max_position"] = int(top if top is not None else inner or 0)
    if ours == "llama3":
        out["rope_scaling_low_freq_factor"] = float(rope["low_freq_factor"])
        out["rope_scaling_high_freq_factor"] = float(rope["high_freq_factor"])
    elif ours == "yarn":
        attention_factor = rope.get("attention_factor")
        if attention_factor is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = (rope_module.yarn_mscale(factor, rope["mscale"])
                                / rope_module.yarn_mscale(factor, rope["mscale_all_dim"]))
        if attention_factor is not None and attention_factor <= 0:
            raise CheckpointError(f"{where}: unsupported {field}.attention_factor="
                                  f"{attention_factor!r}; it must be > 0")
        out.update(rope_scaling_attention_factor=float(attention_factor or 0.0),
                   rope_scaling_beta_fast=float(rope.get("beta_fast") or 32.0),
                   rope_scaling_beta_slow=float(rope.get("beta_slow") or 1.0),
                   rope_scaling_truncate=bool(rope.get("truncate", True)))
    return out


def _rope_fields(d: dict[str, Any], where: str) -> dict[str, Any]:
    """rope_theta and the rope_scaling* fields, from transformers 5's `rope_parameters`, 4's
    `rope_scaling` and `rope_theta`, or both: where both are given they must agree, since
    each transformers version reads only its own."""
    scaling, params = d.get("rope_scaling"), d.get("rope_parameters")
    if params is not None and (not isinstance(params, dict)
                               or not {"rope_type", "type", "rope_theta"} & set(params)):
        raise CheckpointError(
            f"{where}: unsupported config field rope_parameters={params!r}; expected one dict "
            "with a rope_type (per-layer-type RoPE is not implemented)")
    if d.get("partial_rotary_factor") not in (None, 1.0):
        raise CheckpointError(f"{where}: unsupported config field partial_rotary_factor="
                              f"{d['partial_rotary_factor']!r}; RoPE rotates the whole head")
    given = {field: rope for field, rope in (("rope_scaling", scaling), ("rope_parameters", params))
             if rope}
    parsed = {field: _rope_dict(rope, field, d, where) for field, rope in given.items()}
    if len(parsed) == 2 and parsed["rope_scaling"] != parsed["rope_parameters"]:
        raise CheckpointError(f"{where}: rope_scaling={scaling!r} and rope_parameters={params!r} "
                              "describe different RoPE")
    thetas = {float(t) for t in [d.get("rope_theta")] + [r.get("rope_theta") for r in given.values()]
              if t is not None}
    if len(thetas) > 1:
        raise CheckpointError(f"{where}: rope_theta is given as several values {sorted(thetas)}")
    fields = next(iter(parsed.values()), {"rope_scaling": "none"})
    return {"rope_theta": thetas.pop() if thetas else 10000.0, **fields}


def _rope_entries(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's RoPE entries: `rope_parameters` for transformers 5, `rope_theta` and (when
    scaled) `rope_scaling` for transformers 4, all describing the same frequencies."""
    scaling: dict[str, Any] = {"rope_type": {"none": "default"}.get(cfg.rope_scaling,
                                                                    cfg.rope_scaling)}
    if cfg.rope_scaling != "none":
        scaling["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling in ("llama3", "yarn"):
        scaling["original_max_position_embeddings"] = rope_module.original_max_position(cfg)
    if cfg.rope_scaling == "llama3":
        scaling.update(low_freq_factor=cfg.rope_scaling_low_freq_factor,
                       high_freq_factor=cfg.rope_scaling_high_freq_factor)
    elif cfg.rope_scaling == "yarn":
        scaling.update(beta_fast=cfg.rope_scaling_beta_fast, beta_slow=cfg.rope_scaling_beta_slow)
        if cfg.rope_scaling_attention_factor:
            scaling["attention_factor"] = cfg.rope_scaling_attention_factor
        if not cfg.rope_scaling_truncate:
            scaling["truncate"] = False
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta,
                           "rope_parameters": {**scaling, "rope_theta": cfg.rope_theta}}
    if cfg.rope_scaling != "none":
        out["rope_scaling"] = scaling
    return out


def _first(x: Any, default: int) -> int:
    if x is None:
        return default
    return int(x[0]) if isinstance(x, list | tuple) else int(x)


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF config dict; `source` names the file in error messages."""
    archs = d.get("architectures")
    if not archs:
        raise CheckpointError(
            f"{source}: missing 'architectures'; expected one of {sorted(ARCHITECTURES)}")
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unknown architecture {archs!r}; supported: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[archs[0]]
    if d.get("model_type", arch) != arch:
        raise CheckpointError(
            f"{source}: model_type {d['model_type']!r} does not match architecture {archs[0]}")
    missing = [k for k in _REQUIRED if d.get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: missing required config fields {missing}")

    unsupported = {
        "hidden_act": (d.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(d.get("attention_bias", False)), False),
        "mlp_bias": (bool(d.get("mlp_bias", False)), False),
        "attention_dropout": (float(d.get("attention_dropout", 0.0)), 0.0),
        "quantization_config": (d.get("quantization_config"), None),
    }
    for field, (got, want) in unsupported.items():
        if got != want:
            raise CheckpointError(
                f"{source}: unsupported config field {field}={got!r}; this converter handles "
                f"only {field}={want!r}")
    if d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]):
        raise CheckpointError(f"{source}: unsupported config field layer_types={d['layer_types']!r}")

    defaults = _HF_DEFAULTS[arch]
    window = d.get("sliding_window", defaults["sliding_window"]) if arch == "mistral" else None
    heads = int(d["num_attention_heads"])
    dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32")
    try:
        return ModelConfig(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or 0),
            max_position_embeddings=int(d.get("max_position_embeddings")
                                        or defaults["max_position_embeddings"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            **_rope_fields(d, source),
            sliding_window=int(window or 0),
            architecture=arch,
            bos_token_id=_first(d.get("bos_token_id"), 1),
            eos_token_id=_first(d.get("eos_token_id"), 2),
            pad_token_id=_first(d.get("pad_token_id"), 0),
            initializer_range=float(d.get("initializer_range", 0.02)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            dtype=dtype if dtype in _DTYPES else "float32",
            param_dtype=dtype if dtype in _DTYPES else "float32",
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def hf_config_from(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The `config.json` dict transformers needs to rebuild `cfg` as Llama/Mistral.

    Writes both `rope_parameters` (transformers 5) and `rope_theta`/`rope_scaling`
    (transformers 4) so either version builds the same RoPE.
    """
    if cfg.architecture == "llama" and cfg.sliding_window:
        raise CheckpointError(
            f"a llama model cannot carry sliding_window={cfg.sliding_window} in HF format; "
            "use architecture='mistral'")
    d: dict[str, Any] = {
        "architectures": [HF_CLASS[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        **_rope_entries(cfg),
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype or cfg.param_dtype,
    }
    if cfg.architecture == "llama":
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        d["sliding_window"] = cfg.sliding_window or None
    return d


def generation_config_from(cfg: ModelConfig) -> dict[str, Any]:
    """A minimal `generation_config.json`: the special token ids generation needs."""
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


def read_config(directory: Path) -> ModelConfig:
    """Read and check `directory/config.json`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json; is {directory} a Hugging Face model "
                              "directory?")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config.json: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    return config_from_hf(d, source=str(path))
