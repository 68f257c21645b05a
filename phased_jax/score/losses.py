"""Each answer's mean token loss under the base model, with and without its instruction.

The answer is the tokens training puts loss on (`data/tokens.py`): the template's target (the
output and its EOS), or in a conversation every assistant turn with its end-of-turn token. With
the instruction, an example is the training example (prompt + answer, or the whole
conversation, cut at `max_length`), its loss training's masked cross-entropy over the answer
tokens. Alone, each answer is `BOS + answer` (a conversation's assistant turns each after a
BOS of its own, none seeing another: one packed row of segments), cut to the answer tokens the
first example kept, so both means run over the same tokens; the loss is on every answer token
(BOS predicts the first).

Forward passes are batched and sharded on the experiment's mesh: a fixed number of rows (a
multiple of the batch shards, empty rows padding the last batch) and row lengths rounded up to
a multiple of `length_multiple`, so one compile serves each length bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from phased_jax.data.chat import runs
from phased_jax.data.templates import special_id
from phased_jax.data.tokens import TokenizedExamples, build_rows
from phased_jax.sharding import Placement
from phased_jax.train.loss import cross_entropy_sums

ForwardFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]


def answers_alone(examples: TokenizedExamples, tokenizer: Any
                  ) -> tuple[TokenizedExamples, list[np.ndarray]]:
    """`BOS + answer` for each answer an example kept (a conversation has one per assistant
    turn), with no instruction, and the indices of each example's answers: packed into one
    row, each answer is its own segment, so none sees another."""
    bos = special_id(tokenizer, "bos")
    parts, groups = [], []
    for i in range(len(examples)):
        ids, trained = examples.example(i)
        start = len(parts)
        for a, b in runs(trained):
            piece = np.concatenate([[bos], ids[a:b]]).astype(np.int32)
            parts.append((piece, np.arange(len(piece)) >= 1))
        groups.append(np.arange(start, len(parts)))
    rids = [examples.record_ids[i] for i, g in enumerate(groups) for _ in g]
    return (TokenizedExamples.of(parts, rids, examples.max_length, examples.pad_id), groups)


def make_forward(model: nn.Module, placement: Placement) -> ForwardFn:
    """jit(params, rows) -> (summed answer loss [B], answer tokens [B]), per row, float32."""
    def forward(params: Any, rows: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        with nn.logical_axis_rules(placement.rules):
            logits_BxLxV = model.apply({"params": params}, rows["input_ids"],
                                       positions_BxL=rows["positions"],
                                       segment_ids_BxL=rows["segment_ids"])
        ce_B, _ = jax.vmap(cross_entropy_sums)(logits_BxLxV, rows["targets"], rows["loss_mask"])
        return ce_B, rows["loss_mask"].sum(axis=-1)
    # Replicated results: every host reads them whole (no cross-host gather).
    replicated = NamedSharding(placement.mesh, PartitionSpec())
    jitted = jax.jit(forward, out_shardings=(replicated, replicated))

    def on_mesh(params: Any, rows: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        with jax.set_mesh(placement.mesh):  # kernels like splash attention run per device on it
            return jitted(params, rows)
    return on_mesh


def bucket_length(n: int, multiple: int, max_length: int) -> int:
    return min(-(-n // multiple) * multiple, max_length)


def mean_losses(forward: ForwardFn, params: Any, examples: TokenizedExamples,
                placement: Placement, batch_size: int, length_multiple: int,
                groups: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Mean answer loss per example, or per group of examples packed into one row (float64
    [N or groups]; nan where no answer token is left).

    Rows go in length order, so a batch's rows need little padding; results come back in
    the examples' (groups') order.
    """
    if groups is None:
        groups = [np.array([i]) for i in range(len(examples))]
    lengths = np.array([int(examples.lengths[g].sum()) for g in groups], np.int64)
    shards = placement.batch_shards
    rows_per_batch = -(-batch_size // shards) * shards
    order = np.argsort(lengths, kind="stable")
    sums, counts = np.zeros(len(groups)), np.zeros(len(groups))
    for start in range(0, len(order), rows_per_batch):
        batch: Sequence[int] = order[start:start + rows_per_batch].tolist()
        length = bucket_length(int(max(lengths[batch].max(), 1)), length_multiple,
                               examples.max_length)
        shaped = dataclasses.replace(examples, max_length=length)
        rows = build_rows(shaped, [groups[i] for i in batch]
                          + [None] * (rows_per_batch - len(batch)))
        ce_B, n_B = forward(params, {k: placement.put_batch(v) for k, v in rows.items()})
        ce_B, n_B = np.asarray(jax.device_get(ce_B)), np.asarray(jax.device_get(n_B))
        sums[batch], counts[batch] = ce_B[:len(batch)], n_B[:len(batch)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
