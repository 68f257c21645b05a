"""Phased IFT, Llama-3 8B (the paper's v2).

Fits a TPU v5p-8 (4 chips; the default mesh: pure FSDP, 1x4x1): `phased-jax compile --tpu v5p-8`
peaks at 62.5 GiB a chip of 95 (global batch 128 x 2048, splash attention, chunked loss;
batch 256 fits at 90.1). The 128,256-token vocabulary makes the loss chunk matter: with full
logits the step peaks at 90.3 GiB, at the loss.

The authors' template as in the paper (BOS/EOS are `<|begin_of_text|>`/`<|end_of_text|>`).
For Llama-3's chat format instead add `--config.data.template=chat
--config.data.tokenizer=checkpoints/Meta-Llama-3-8B-Instruct` (the same vocabulary, with Meta's
chat template): answers then end with `<|eot_id|>`, where `phased-jax generate` stops too.
"""

from phased_jax.paper import paper_config


def get_config():
    return paper_config("llama3-8b", order="1,2,3", name="llama3_8b_phased")
