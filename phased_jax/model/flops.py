"""FLOPs per token from the real shapes, for MFU."""

from __future__ import annotations

from phased_jax.model.config import ModelConfig


def layer_param_count(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer: attention, SwiGLU MLP and the two norms."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    attn = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * D
    return attn + 3 * D * F + 2 * D


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the decoder, as Hugging Face counts them: the embedding and the LM head
    (once when tied), the layers and the final norm."""
    tables = 1 if cfg.tie_word_embeddings else 2
    return (cfg.num_layers * layer_param_count(cfg) + tables * cfg.vocab_size * cfg.hidden_size
            + cfg.hidden_size)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token of a forward (x3 for training: forward + two backward matmuls).

    Counts 2 FLOPs per multiply-add in every projection (fused QKV over GQA shapes, SwiGLU's three
    matrices, the LM head) and in attention's two products, where a causal query at position i
    sees min(i + 1, window) keys: averaged over the sequence. Embedding lookups, norms and
    softmax are ignored, as in the usual MFU accounting.
    """
    D, F, V, Hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    proj = D * (cfg.num_heads + 2 * cfg.num_kv_heads) * Hd + cfg.num_heads * Hd * D + 3 * D * F
    window = cfg.sliding_window or seq_len
    mean_keys = sum(min(i + 1, window) for i in range(seq_len)) / seq_len
    attn = 2 * cfg.num_heads * Hd * mean_keys  # QK^T and PV, multiply-adds per token
    forward = 2 * (cfg.num_layers * (proj + attn) + D * V)
    return 3.0 * forward if training else float(forward)
