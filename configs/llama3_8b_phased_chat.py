"""Phased IFT on conversations, Llama-3 8B, in Meta's chat format.

Fits a TPU v5p-8 (4 chips), as `llama3_8b_phased.py`: the same model, batch and length.

The data is `phased-score` output on conversations (OpenAI `messages` or ShareGPT
`conversations` rows, in JSONL, a JSON list or an HF dataset; README "Conversations"). Each is
rendered by Meta-Llama-3-8B-Instruct's chat template (the same vocabulary as the base model,
whose tokenizer has no chat template) and trained on every assistant turn and its
`<|eot_id|>`; a conversation longer than `data.max_length` loses whole trailing turns.
Conversations vary in length more than Alpaca's records: `--config.data.packing=True` fills the
rows (attention stays within each conversation).
"""

from phased_jax.paper import paper_config

CONVERSATIONS = "data/conversations-scored.jsonl"  # `phased-score --turns all` output
CHAT_TOKENIZER = "checkpoints/Meta-Llama-3-8B-Instruct"


def get_config():
    c = paper_config("llama3-8b", order="1,2,3", name="llama3_8b_phased_chat")
    c.data.paths = (CONVERSATIONS,)
    c.data.template = "chat"
    c.data.tokenizer = CHAT_TOKENIZER
    return c
