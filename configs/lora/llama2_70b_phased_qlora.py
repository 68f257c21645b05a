"""Phased IFT, Llama-2 70B with QLoRA: rank-16 adapters on q, k, v, o, gate, up, down over a
frozen NF4 base.

Fits a TPU v5e-8 (8 chips of 16 GiB; the default mesh: pure FSDP, 1x8x1) with
train.grad_accum=16: global batch 128 x 2048 as in the paper, one sequence a chip per
micro-batch. `phased-jax compile --tpu v5e-8` measured it (benchmarks/tpu_compile.py, README
Benchmarks).

The base's layer projections are stored as NF4 codes with a float32 absmax per block of 64
(0.56 bytes a weight; 36 GiB for 70B) and dequantised to bfloat16 one layer at a time inside
the layer scan; the embedding, LM head and norms stay in bfloat16 (model.param_dtype). The
adapters and their AdamW moments are float32. LoRA's usual learning rate (QLoRA, Dettmers et
al. 2023: 1e-4 for the largest models) replaces the paper's 5e-6, which is full fine-tuning's.
"""

from phased_jax.paper import paper_config


def get_config():
    c = paper_config("llama2-70b", order="1,2,3", name="llama2_70b_phased_qlora")
    c.model.param_dtype = "bfloat16"  # the embedding, LM head and norms of the frozen base
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.dropout = 0.0
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.model.lora.base_qtype = "nf4"
    c.model.lora.merge_each_phase = False
    c.model.lora.init_from = ""  # PEFT's init (A Kaiming-uniform, B zero)
    c.train.lr = 1e-4
    c.train.grad_accum = 16
    c.export.lora = "both"  # the merged HF model (hf/) and the PEFT adapter (adapter/)
    return c
