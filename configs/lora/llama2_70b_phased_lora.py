"""Phased IFT, Llama-2 70B with LoRA adapters (rank 16 on q, k, v, o, gate, up, down).

Fits a TPU v5p-8 (4 chips; the default mesh: pure FSDP, 1x4x1) with train.grad_accum=4:
global batch 128 x 2048 as in the paper, 8 sequences a chip per micro-batch. Without
accumulation the 80 layers' saved inputs alone (32 sequences a chip: 80 x 65,536 tokens x
8192 x bf16 = 80 GiB) exceed a chip's 95 GiB beside the 32 GiB of frozen bf16 base.
`phased-jax compile --tpu v5p-8` measured it (benchmarks/tpu_compile.py, README Benchmarks).

The frozen base is stored in bfloat16 (model.param_dtype; the adapters and their AdamW moments
are float32 whatever it is); it has no gradient and no optimizer state. LoRA's usual learning
rate (QLoRA, Dettmers et al. 2023: 1e-4 for the largest models) replaces the paper's 5e-6,
which is full fine-tuning's.
"""

from phased_jax.paper import paper_config


def get_config():
    c = paper_config("llama2-70b", order="1,2,3", name="llama2_70b_phased_lora")
    c.model.param_dtype = "bfloat16"  # the frozen base
    c.model.lora.rank = 16
    c.model.lora.alpha = 32.0
    c.model.lora.dropout = 0.0
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.model.lora.base_qtype = ""
    c.model.lora.merge_each_phase = False
    c.model.lora.init_from = ""  # PEFT's init (A Kaiming-uniform, B zero)
    c.train.lr = 1e-4
    c.train.grad_accum = 4
    c.export.lora = "both"  # the merged HF model (hf/) and the PEFT adapter (adapter/)
    return c
