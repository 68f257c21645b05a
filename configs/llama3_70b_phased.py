"""Phased IFT, Llama-3 70B (the paper's v2).

Fits a TPU v5p-128 (64 chips; the default mesh: pure FSDP, 1x64x1, what `phased-jax plan`
suggests): `phased-jax compile --tpu v5p-128` peaks at 32.5 GiB a chip of 95 (global batch
128 x 2048, splash attention, chunked loss; batch 1024 fits at 76.9). Over 64 chips the logits
are small: the full loss would peak at 27.6 GiB. Half the slice, v5p-64 (1x32x1), fits too,
at 57.5 GiB.

The authors' template as in the paper; for Llama-3's chat format add
`--config.data.template=chat --config.data.tokenizer=checkpoints/Meta-Llama-3-70B-Instruct`
(see llama3_8b_phased.py).
"""

from phased_jax.paper import paper_config


def get_config():
    return paper_config("llama3-70b", order="1,2,3", name="llama3_70b_phased")
