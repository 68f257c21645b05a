"""`model.init_from`: the checkpoint a run starts from, read for its shapes before any data.

A config's model either names a preset, whose shapes must then equal the checkpoint's, or is
`model.preset="auto"` (`model_section("auto")`): every field of `CHECKPOINT_FIELDS` then comes
from the checkpoint's `config.json` (Hugging Face) or `model_config.json` (phased-jax), as
`from_pretrained` does, and only `RUN_FIELDS` (precision, remat, attention kernel) stay the
config's. Either way a mismatch is one line naming the field and both values, found from two
small JSON files before any data is read or any weight loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ml_collections import ConfigDict

from phased_jax.errors import CheckpointError, ConfigError
from phased_jax.hf.hf_config import read_config
from phased_jax.model.config import PRESETS, ModelConfig
from phased_jax.params_checkpoint import read_model_config

AUTO = "auto"
HF_CONFIG, PARAMS_CONFIG = "config.json", "model_config.json"
# How the run computes; everything else describes the checkpoint's model.
RUN_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "attention_block_q",
              "attention_block_kv")
CHECKPOINT_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                          if f.name not in RUN_FIELDS)
# What a named preset must share with its init_from: the parameters' shapes and the tie.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "tie_word_embeddings")


def checkpoint_kind(path: str, field: str = "model.init_from") -> str:
    """`hf` (a directory with config.json) or `params` (model_config.json); else ConfigError."""
    if not Path(path).exists():
        raise ConfigError(f"{field}: no such file or directory: {path}")
    if Path(path, HF_CONFIG).is_file():
        return "hf"
    if Path(path, PARAMS_CONFIG).is_file():
        return "params"
    raise ConfigError(f"{field}={path!r} is neither a Hugging Face model directory "
                      f"({HF_CONFIG}) nor a phased-jax params checkpoint ({PARAMS_CONFIG}): "
                      "give the directory that holds one of them")


def read_checkpoint_config(path: str, field: str = "model.init_from") -> ModelConfig:
    """The model config a checkpoint directory states, either kind; one-line errors."""
    kind = checkpoint_kind(path, field)
    try:
        if kind == "hf":
            return read_config(Path(path))
        return read_model_config(path)
    except CheckpointError as e:
        raise ConfigError(f"{field}: {e}") from None


def resolve_model(config: ConfigDict, source: str = "", source_field: str = "") -> None:
    """Fill an `auto` model section from its checkpoint (`source`, named `source_field` in
    messages; default `model.init_from`), or check a named preset against `model.init_from` where it exists (whether it must exist
    is the command's business: `plan` and `compile` need no weights); in place, idempotent."""
    section = config.model
    path = source or section.get("init_from", "")
    field = source_field if source else "model.init_from"
    if section.get("preset") == AUTO:
        if not path:
            raise ConfigError("model.preset='auto' takes the model's shape from "
                              "model.init_from, which is empty: set --config.model.init_from=DIR "
                              "(a Hugging Face directory or phased-jax checkpoint) or name a preset")
        got = read_checkpoint_config(path, field)
        for name in CHECKPOINT_FIELDS:
            mine, theirs = section.get(name), getattr(got, name)
            if mine is not None and mine != theirs:
                raise ConfigError(f"model.{name}={mine!r} differs from {theirs!r} in {path} "
                                  f"(model.preset='auto' takes every shape field from "
                                  f"{field}): drop the override, or name a preset")
        for name in CHECKPOINT_FIELDS:
            section[name] = getattr(got, name)
    elif path and not source and Path(path).exists():  # `plan` needs no weights to exist yet
        got = read_checkpoint_config(path, field)
        for name in SHAPE_FIELDS:
            mine, theirs = _stated(section, name), getattr(got, name)
            if mine != theirs:
                raise ConfigError(
                    f"model.{name}={mine!r} (preset {section.get('preset')!r}) differs from "
                    f"{theirs!r} in model.init_from={path!r}: set --config.model.preset=auto to "
                    "take the model's shape from the checkpoint, or fix the field")


def unset_preset_fields(section: ConfigDict, preset: str) -> None:
    """Empty the fields that still hold `preset`'s values, so `--config.model.preset=auto` on a
    config built from a named preset takes them from the checkpoint; a field the config file
    or command line changed stays stated (and must then agree with the checkpoint)."""
    if section.get("preset") != AUTO or preset not in PRESETS:
        return
    for name in CHECKPOINT_FIELDS:
        if section.get(name) == getattr(PRESETS[preset], name):
            section[name] = None


def _stated(section: ConfigDict, name: str) -> object:
    """A section's field as the model will see it (head_dim 0 means hidden_size // num_heads)."""
    if name == "head_dim" and not section.get("head_dim"):
        return section.hidden_size // section.num_heads
    return section.get(name)
