"""LoRA as PEFT defines it: W' = W + (alpha / r) B A on chosen projections, the base frozen.

Why our own and not qwix's `LoraProvider`: our attention projects q, k and v with one fused
weight [D, K, G+2, H] and the MLP's gate and up with one [D, 2, F]. A provider that wraps each
einsum would adapt the fused weight with one A and B, which no PEFT adapter can express (PEFT
keeps one adapter per `q_proj`, `k_proj`, ...). Here each target has its own A [in, r] and
B [r, out], its update added to its slice of the fused projection, so adapters convert one to
one to PEFT's files (`phased_jax.hf.peft`) and `scale * x A B` is exactly peft's
`lora_B(lora_A(dropout(x))) * scale`.

Targets are named by short name (`q`, `k`, `v`, `o`, `gate`, `up`, `down`) or by a regex
over the modules' names, which are Hugging Face's (`self_attn.q_proj`, `mlp.down_proj`, ...)
so a pattern written for PEFT works here too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phased_jax.model.config import ModelConfig

Array = jax.Array

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
QTYPES = ("", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapters a model carries: rank r > 0, alpha, input dropout and the targets."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS  # short names, in TARGETS order
    dropout: float = 0.0
    base_qtype: str = ""  # "" = the base in param_dtype; "int8" or "nf4": `model.quant`

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Short target names from a list of them or a regex over module names (`self_attn.q_proj`);
    ValueError naming what it could have matched when nothing matches."""
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"model.lora.targets {targets!r} is not a regex: {e}") from None
        found = tuple(t for t in TARGETS if pattern.fullmatch(MODULES[t]) or pattern.fullmatch(t))
        if not found:
            raise ValueError(f"model.lora.targets {targets!r} matches no module; the modules are "
                             f"{', '.join(MODULES[t] for t in TARGETS)} (or their short names "
                             f"{', '.join(TARGETS)})")
        return found
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"model.lora.targets {tuple(targets)!r}: "
                         + (f"{unknown[0]!r} is not one of " if unknown else "empty; choose from ")
                         + f"{', '.join(TARGETS)} (or give a regex over "
                         f"{', '.join(MODULES[t] for t in TARGETS)})")
    return tuple(t for t in TARGETS if t in targets)


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """The short targets `model.lora.targets` names: a comma-separated list of short names, or
    else one regex over module names (`resolve_targets`). A list of plain words with an
    unknown one ("q,vv") is read as a list, so the message names the word, not the regex."""
    if not isinstance(targets, str):
        return resolve_targets(tuple(targets))
    parts = [p.strip() for p in targets.split(",") if p.strip()]
    if all(p in TARGETS for p in parts) or (
            "," in targets and all(re.fullmatch(r"\w+", p) for p in parts)):
        return resolve_targets(parts)  # an empty list (e.g. "") raises, naming the choices
    return resolve_targets(targets)


def spec_from_section(section: Any) -> LoraSpec | None:
    """The LoraSpec of a `model.lora` config section (a ConfigDict or mapping), or None when
    LoRA is off (rank 0, or no section: configs from before LoRA): full fine-tuning."""
    if section is None or not section["rank"]:
        return None
    rank = section["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"model.lora.rank={rank!r}: it must be an integer >= 0 (0 = off)")
    return LoraSpec(rank, float(section["alpha"]), parse_targets(section["targets"]),
                    float(section["dropout"]), str(section.get("base_qtype", "") or ""))


def shapes(cfg: ModelConfig, target: str, rank: int) -> tuple[tuple[tuple[int, ...], tuple], ...]:
    """((A shape, A logical axes), (B shape, B logical axes)) of one layer's adapter, laid out
    as the base weight it adapts (so the one rule table shards it the same way; r unsharded)."""
    D, F, K, G, H = (cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads, cfg.group_size,
                     cfg.head_dim)
    embed_in = ((D, rank), ("embed", None))
    return {
        "q": (embed_in, ((rank, K, G, H), (None, "kv_heads", None, "head_dim"))),
        "k": (embed_in, ((rank, K, H), (None, "kv_heads", "head_dim"))),
        "v": (embed_in, ((rank, K, H), (None, "kv_heads", "head_dim"))),
        "o": (((K, G, H, rank), ("kv_heads", None, "head_dim", None)), ((rank, D), (None, "embed"))),
        "gate": (embed_in, ((rank, F), (None, "mlp"))),
        "up": (embed_in, ((rank, F), (None, "mlp"))),
        "down": (((F, rank), ("mlp", None)), ((rank, D), (None, "embed"))),
    }[target]


def kaiming_uniform_a(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """PEFT's A init: torch's kaiming_uniform_(a=sqrt(5)) on the [r, in] weight, i.e.
    U(-1/sqrt(in), 1/sqrt(in)), `in` being every axis but the last (r) of ours."""
    fan_in = math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Adapter(nn.Module):
    """One target's A and B (float32 always, as the optimizer state): `scale * x A B`."""

    cfg: ModelConfig
    spec: LoraSpec
    target: str
    deterministic: bool = True  # False in training: dropout on the adapter's input

    @nn.compact
    def __call__(self, x: Array, in_spec: str) -> Array:
        """x: the projection's input; in_spec: its einsum letters for the input axes after
        `bl` (e.g. "d", or "kgh" for o_proj's heads)."""
        (a_shape, a_axes), (b_shape, b_axes) = shapes(self.cfg, self.target, self.spec.rank)
        a = self.param("a", nn.with_logical_partitioning(kaiming_uniform_a, a_axes), a_shape,
                       jnp.float32)
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, b_axes), b_shape,
                       jnp.float32)
        if self.spec.dropout > 0:
            x = nn.Dropout(self.spec.dropout)(x, deterministic=self.deterministic)
        out = "MNOP"[: len(b_shape) - 1]  # B's output axes
        h = jnp.einsum(f"bl{in_spec},{in_spec}r->blr", x, a.astype(x.dtype))
        return jnp.einsum(f"blr,r{out}->bl{out}", h, b.astype(x.dtype)) * jnp.asarray(
            self.spec.scale, x.dtype)


def split(params: dict) -> tuple[dict, dict]:
    """(base, adapters): the params tree cut in two at the adapters (`lora_<target>` modules)."""
    def cut(tree: dict, want: bool) -> dict:
        out = {}
        for k, v in tree.items():
            if k.startswith("lora_"):
                if want:
                    out[k] = v
            elif isinstance(v, dict):
                sub = cut(v, want)
                if sub:
                    out[k] = sub
            elif not want:
                out[k] = v
        return out
    return cut(params, False), cut(params, True)


def join(base: dict, adapters: dict) -> dict:
    """The whole params tree of a base and its adapters (`split`'s inverse)."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = join(base[k], v) if k in base and isinstance(v, dict) and not k.startswith(
            "lora_") else v
    return out


def slot(cfg: ModelConfig, target: str) -> tuple[str, str, tuple]:
    """(module, weight, index): where `target`'s update goes in one layer of the fused weights
    (`qkv` [D, K, G+2, H], `o`, `wi` [D, 2, F], `wo`), for every merge of ours."""
    G = cfg.group_size
    index = {"q": (slice(None),) * 2 + (slice(0, G),), "k": (slice(None),) * 2 + (G,),
             "v": (slice(None),) * 2 + (G + 1,), "gate": (slice(None), 0),
             "up": (slice(None), 1)}.get(target, ())
    weight = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "wi", "up": "wi"}.get(
        target, "wo")
    return ("attn" if target in ("q", "k", "v", "o") else "mlp"), weight, index


def merge(cfg: ModelConfig, spec: LoraSpec, base: dict, adapters: dict) -> dict:
    """Base params with each adapter's scale * A B added to its slice of the fused weights, in
    the base's dtype (jax ops: sharded arrays stay where they are under jit)."""
    layers = {m: dict(v) for m, v in base["layers"].items()}
    for t in spec.targets:
        module, name, index = slot(cfg, t)
        ad = adapters["layers"][module][f"lora_{t}"]
        a, b = jnp.asarray(ad["a"], jnp.float32), jnp.asarray(ad["b"], jnp.float32)
        L, r = a.shape[0], spec.rank
        delta = jnp.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1)) * jnp.float32(spec.scale)
        # the float32 update added to the weight in float32 and rounded once, as peft merges
        w = jnp.asarray(layers[module][name])
        sl = (slice(None),) + index  # every layer
        layers[module][name] = (w.astype(jnp.float32).at[sl].add(delta.reshape(w[sl].shape))
                                .astype(w.dtype))
    return {**base, "layers": layers}
