"""Batched decoding with a KV cache: one prefill call, then one token a step in a `while_loop`.

Prompts of different lengths share a batch by left padding: pads are segment 0 (never attended
to), and each row's positions start at 0 at its first real token. All rows then write the same
cache slot each step, so the cache needs one index for the whole batch, and a row's logits are
those it would get alone (the mask rule of `phased_jax.model.attention`).

The loop stops when every row has hit EOS or its own budget (`min(max_new_tokens,
max_length - prompt length)`), so a batch of short answers does not pay for the longest budget.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from phased_jax import sharding
from phased_jax.data.templates import encode_prompt, stop_ids
from phased_jax.data.tokens import pad_id_of
from phased_jax.generate import cpu
from phased_jax.model.cache import KVCache
from phased_jax.model.transformer import Transformer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (the paper's setting)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits_BxV: Array, key: Array, sampling: Sampling) -> Array:
    """Next token ids [batch]: argmax, or a draw from the top-p nucleus at a temperature."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        keep_BxV = mass_before_BxV < sampling.top_p  # always keeps the most likely token
        threshold_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """ids and segment ids [batch, length]; rows past len(prompts) are empty (all segment 0)."""
    ids_BxP = np.full((batch, length), pad_id, np.int32)
    seg_BxP = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids_BxP[row, length - len(prompt):] = prompt
            seg_BxP[row, length - len(prompt):] = 1
    return ids_BxP, seg_BxP


def _decode(model: Transformer, max_new: int, sampling: Sampling, unstack: bool, params: Any,
            ids_BxP: Array, seg_BxP: Array, budget_B: Array, eos_ids: Array, key: Array) -> Array:
    """Tokens [batch, max_new]; a row's entries past its EOS or budget are pad (-1)."""
    B, P = ids_BxP.shape
    if unstack:
        if not isinstance(params["layers"], tuple):  # not split by the caller yet:
            params = cpu.unstack_layers(params)  # once, outside the loop (a copy, under jit)
        model = cpu.UnrolledTransformer(model.cfg, model.lora)
        cache = cpu.per_layer_cache(model.cfg, B, P + max_new)
    else:
        cache = KVCache.empty(model.cfg, B, P + max_new)
    lens_B = jnp.sum(seg_BxP, axis=-1)
    pos_BxP = jnp.maximum(jnp.cumsum(seg_BxP, axis=-1) - 1, 0)
    logits_Bx1xV, cache = model.apply({"params": params}, ids_BxP, positions_BxL=pos_BxP,
                                      segment_ids_BxL=seg_BxP, cache=cache, last_only=True)
    key, sub = jax.random.split(key)
    tok_B = sample_next(logits_Bx1xV[:, -1], sub, sampling)
    done_B = jnp.isin(tok_B, eos_ids) | (budget_B <= 1)
    tok_B = jnp.where(budget_B >= 1, tok_B, -1)
    out_BxT = jnp.full((B, max_new), -1, jnp.int32).at[:, 0].set(tok_B)

    def cond(state):
        step, _, _, done_B, _, _ = state
        return (step < max_new) & ~jnp.all(done_B)

    def body(state):
        step, tok_B, out_BxT, done_B, cache, key = state
        logits_Bx1xV, cache = model.apply(
            {"params": params}, jnp.maximum(tok_B, 0)[:, None],
            positions_BxL=(lens_B + step - 1)[:, None],
            segment_ids_BxL=jnp.ones((B, 1), jnp.int32), cache=cache)
        key, sub = jax.random.split(key)
        nxt_B = sample_next(logits_Bx1xV[:, 0], sub, sampling)
        nxt_B = jnp.where(done_B, -1, nxt_B)
        out_BxT = jax.lax.dynamic_update_slice(out_BxT, nxt_B[:, None], (0, step))
        done_B = done_B | jnp.isin(nxt_B, eos_ids) | (step + 1 >= budget_B)
        return step + 1, nxt_B, out_BxT, done_B, cache, key

    state = (jnp.int32(1), tok_B, out_BxT, done_B, cache, key)
    return jax.lax.while_loop(cond, body, state)[2]


@functools.lru_cache(maxsize=32)
def decode_fn(model: Transformer, max_new: int, sampling: Sampling, unstack: bool | None = None):
    """The jitted decoder for one model, output length and sampling rule (shapes retrace).

    unstack: decode layer by layer on per-layer weights (`cpu.UnrolledTransformer`; params
    may come split already by `cpu.unstack_layers`) rather than by the layer scan. None: on the
    CPU backend only (see `phased_jax.generate.cpu`).
    """
    unstack = cpu.unstack_by_default(unstack)
    return jax.jit(functools.partial(_decode, model, max_new, sampling, unstack),
                   compiler_options=cpu.compiler_options())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate_ids(model: Transformer, params: Any, prompts: Sequence[Sequence[int]], *,
                 eos_token_ids: Sequence[int], max_new_tokens: int = 1024,
                 max_length: int = 1024, batch_size: int = 8, sampling: Sampling = Sampling(),
                 seed: int = 0, pad_id: int = 0, placement: sharding.Placement | None = None,
                 keep_eos: bool = False, length_multiple: int = 16,
                 unstack: bool | None = None, key: Array | None = None) -> list[list[int]]:
    """Answer token ids for each prompt, in input order (`unstack`: see `decode_fn`; `key`:
    the sampling key, default `jax.random.key(seed)`, so calls can draw apart).

    Prompts are sorted by length into batches to cut padding; each batch's prompt and answer
    lengths are rounded up to `length_multiple` so few shapes are compiled. A prompt that leaves
    no room under `max_length` gets an empty answer.
    """
    if placement is not None:
        batch_size = _round_up(batch_size, placement.batch_shards)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if cpu.unstack_by_default(unstack):  # once for all batches, and without a copy where it can
        params = cpu.unstack_layers(params)
    eos_ids = jnp.asarray(list(eos_token_ids) or [-2], jnp.int32)
    key = jax.random.key(seed) if key is None else key
    answers: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch_prompts = [list(prompts[i]) for i in rows]
        budgets = [max(0, min(max_new_tokens, max_length - len(p))) for p in batch_prompts]
        if max(budgets) == 0:
            continue
        P = _round_up(max(1, max(len(p) for p in batch_prompts)), length_multiple)
        T = min(_round_up(max(budgets), length_multiple), max_new_tokens)
        ids_BxP, seg_BxP = left_pad(batch_prompts, P, batch_size, pad_id)
        budget_B = np.zeros((batch_size,), np.int32)
        budget_B[:len(rows)] = budgets
        key, sub = jax.random.split(key)
        fn = decode_fn(model, T, sampling, unstack)
        if placement is None:
            out_BxT = fn(params, ids_BxP, seg_BxP, budget_B, eos_ids, sub)
        else:
            with jax.set_mesh(placement.mesh), nn.logical_axis_rules(placement.rules):
                put = placement.put_batch
                out_BxT = fn(params, put(ids_BxP), put(seg_BxP), budget_B, eos_ids, sub)
        out_BxT = _to_host(out_BxT)
        for row, i in enumerate(rows):
            answers[i] = _trim(out_BxT[row], set(eos_token_ids), keep_eos)
    return answers


def _to_host(x: Array) -> np.ndarray:
    """The whole array on this host, gathering from other processes when it spans hosts."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _trim(tokens_T: np.ndarray, eos: set[int], keep_eos: bool) -> list[int]:
    out: list[int] = []
    for t in tokens_T.tolist():
        if t < 0:
            break
        if t in eos:
            if keep_eos:
                out.append(t)
            break
        out.append(t)
    return out


def encode(tokenizer: Any, prompt: str | Sequence[int] | Mapping[str, str],
           template: str | None) -> list[int]:
    """Prompt ids: a record or an instruction rendered with the training template, or as given."""
    if isinstance(prompt, Mapping):
        return encode_prompt(prompt["instruction"], prompt.get("input") or "", template or "authors",
                             tokenizer)
    if isinstance(prompt, str):
        if template is None:
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return encode_prompt(prompt, "", template, tokenizer)
    return [int(t) for t in prompt]


def generate(model: Transformer, params: Any, tokenizer: Any,
             prompts: Sequence[str | Sequence[int] | Mapping[str, str]], *,
             template: str | None = "authors", max_new_tokens: int = 1024,
             max_length: int = 1024, batch_size: int = 8, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, placement: sharding.Placement | None = None,
             length_multiple: int = 16) -> list[str]:
    """Answers (decoded text, the stop token dropped), in input order. An answer ends at EOS
    or at the token that ended every answer in training (`templates.stop_ids`).

    Each prompt is a record `{"instruction", "input"}` or an instruction string, rendered with
    `template` exactly as in training; or token ids, used as given. `template=None` tokenizes
    strings as they are (no BOS added). Defaults are the paper's: greedy, 1024 tokens in all.
    """
    ids = [encode(tokenizer, p, template) for p in prompts]
    eos, pad = stop_ids(template, tokenizer), pad_id_of(tokenizer)
    out = generate_ids(model, params, ids, eos_token_ids=eos, max_new_tokens=max_new_tokens,
                       max_length=max_length, batch_size=batch_size,
                       sampling=Sampling(temperature, top_p), seed=seed, pad_id=pad,
                       placement=placement, length_multiple=length_multiple)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in out]
