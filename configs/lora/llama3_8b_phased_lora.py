"""Phased IFT, Llama-3 8B with LoRA adapters (rank 16 on q, k, v, o, gate, up, down).

Fits a TPU v5e-4 (4 chips of 16 GiB; the default mesh: pure FSDP, 1x4x1) with
train.grad_accum=8: global batch 128 x 2048 as in the paper, 4 sequences a chip per
micro-batch. `phased-jax compile --tpu v5e-4` measured it (benchmarks/tpu_compile.py, README
Benchmarks).

The frozen base is stored in bfloat16 (model.param_dtype; the adapters and their AdamW moments
are float32 whatever it is); it has no gradient and no optimizer state. LoRA's usual learning
rate (QLoRA, Dettmers et al. 2023: 2e-4 up to 13B) replaces the paper's 5e-6, which is full
fine-tuning's.
"""

from phased_jax.paper import paper_config


def get_config():
    c = paper_config("llama3-8b", order="1,2,3", name="llama3_8b_phased_lora")
    c.model.param_dtype = "bfloat16"  # the frozen base
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.dropout = 0.0
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.model.lora.base_qtype = ""
    c.model.lora.merge_each_phase = False
    c.model.lora.init_from = ""  # PEFT's init (A Kaiming-uniform, B zero)
    c.train.lr = 2e-4
    c.train.grad_accum = 8
    c.export.lora = "both"  # the merged HF model (hf/) and the PEFT adapter (adapter/)
    return c
