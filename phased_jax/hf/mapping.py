"""The one table between Hugging Face tensor names and our parameter pytree (Llama and Mistral).

Each rule maps one of our leaves to one or more HF tensors. Rules on `layers` hold one layer at a
time: our leaf is the stack of `to_ours` over layers, so the converter never needs more than one
layer's HF tensors in hand. HF linear weights are [out, in]; ours are [in, out].
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from phased_jax.model.config import ModelConfig

Shapes = Callable[[ModelConfig], tuple[tuple[int, ...], ...]]
LAYER_PREFIX = "model.layers.{i}."

# Tensors some HF checkpoints carry that hold no parameters (recomputed buffers).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One leaf of ours <-> its HF tensors (`{i}` in a name is the layer index)."""

    path: tuple[str, ...]
    hf: tuple[str, ...]
    hf_shapes: Shapes
    to_ours: Callable[[ModelConfig, Sequence[np.ndarray]], np.ndarray]
    to_hf: Callable[[ModelConfig, np.ndarray], tuple[np.ndarray, ...]]

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf[0]

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf) if self.layered else self.hf


def _c(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x)


def _identity_rule(path: tuple[str, ...], name: str, shape: Callable[[ModelConfig], tuple[int, ...]]
                   ) -> Rule:
    return Rule(path, (name,), lambda c: (shape(c),),
                to_ours=lambda c, t: t[0], to_hf=lambda c, x: (_c(x),))


def _transpose_rule(path: tuple[str, ...], name: str,
                    shape: Callable[[ModelConfig], tuple[int, ...]]) -> Rule:
    return Rule(path, (name,), lambda c: (shape(c),),
                to_ours=lambda c, t: t[0].T, to_hf=lambda c, x: (_c(x.T),))


def _qkv_to_ours(c: ModelConfig, t: Sequence[np.ndarray]) -> np.ndarray:
    D, K, G, H = c.hidden_size, c.num_kv_heads, c.group_size, c.head_dim
    q, k, v = t
    return np.concatenate([q.T.reshape(D, K, G, H), k.T.reshape(D, K, 1, H),
                           v.T.reshape(D, K, 1, H)], axis=2)


def _qkv_to_hf(c: ModelConfig, x: np.ndarray) -> tuple[np.ndarray, ...]:
    D, K, G, H = c.hidden_size, c.num_kv_heads, c.group_size, c.head_dim
    return (_c(x[:, :, :G].reshape(D, K * G * H).T), _c(x[:, :, G].reshape(D, K * H).T),
            _c(x[:, :, G + 1].reshape(D, K * H).T))


def _o_to_ours(c: ModelConfig, t: Sequence[np.ndarray]) -> np.ndarray:
    return t[0].T.reshape(c.num_kv_heads, c.group_size, c.head_dim, c.hidden_size)


def _o_to_hf(c: ModelConfig, x: np.ndarray) -> tuple[np.ndarray, ...]:
    return (_c(x.reshape(c.num_heads * c.head_dim, c.hidden_size).T),)


_L = LAYER_PREFIX
EMBED_RULES: tuple[Rule, ...] = (
    _identity_rule(("embed",), "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
)
LAYER_RULES: tuple[Rule, ...] = (
    _identity_rule(("layers", "attn_norm", "scale"), _L + "input_layernorm.weight",
                   lambda c: (c.hidden_size,)),
    Rule(("layers", "attn", "qkv"),
         (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight",
          _L + "self_attn.v_proj.weight"),
         lambda c: ((c.num_heads * c.head_dim, c.hidden_size),
                    (c.num_kv_heads * c.head_dim, c.hidden_size),
                    (c.num_kv_heads * c.head_dim, c.hidden_size)),
         _qkv_to_ours, _qkv_to_hf),
    Rule(("layers", "attn", "o"), (_L + "self_attn.o_proj.weight",),
         lambda c: ((c.hidden_size, c.num_heads * c.head_dim),), _o_to_ours, _o_to_hf),
    _identity_rule(("layers", "mlp_norm", "scale"), _L + "post_attention_layernorm.weight",
                   lambda c: (c.hidden_size,)),
    Rule(("layers", "mlp", "wi"), (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
         lambda c: ((c.intermediate_size, c.hidden_size),) * 2,
         to_ours=lambda c, t: np.stack([t[0].T, t[1].T], axis=1),
         to_hf=lambda c, x: (_c(x[:, 0].T), _c(x[:, 1].T))),
    _transpose_rule(("layers", "mlp", "wo"), _L + "mlp.down_proj.weight",
                    lambda c: (c.hidden_size, c.intermediate_size)),
)
NORM_RULE = _identity_rule(("final_norm", "scale"), "model.norm.weight", lambda c: (c.hidden_size,))
HEAD_RULE = _transpose_rule(("lm_head",), "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size))
# A tied model's head is the embedding table: a checkpoint may repeat it under this name.
TIED_HEAD = HEAD_RULE.hf[0]


def final_rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    """The final norm, and the head unless tied (HF's save_pretrained writes no tied head)."""
    return (NORM_RULE,) if cfg.tie_word_embeddings else (NORM_RULE, HEAD_RULE)


def rules(cfg: ModelConfig) -> tuple[Rule, ...]:
    """Every rule of `cfg`'s model, in the order HF checkpoints list them: embeddings,
    layer 0..L-1, final norm, head."""
    return EMBED_RULES + LAYER_RULES + final_rules(cfg)


def slices(cfg: ModelConfig) -> Iterator[tuple[Rule, int | None]]:
    """(rule, layer) for every HF tensor group in checkpoint order (layer None: not layered)."""
    for rule in EMBED_RULES:
        yield rule, None
    for i in range(cfg.num_layers):
        for rule in LAYER_RULES:
            yield rule, i
    for rule in final_rules(cfg):
        yield rule, None


def hf_tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every HF tensor name with its shape, in checkpoint order."""
    return [spec for rule, layer in slices(cfg)
            for spec in zip(rule.hf_names(layer), rule.hf_shapes(cfg), strict=True)]


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
