"""One-off IFT baseline, Llama-3 70B: all data in one phase. Fits a TPU v5p-128, as
llama3_70b_phased.py (the same step; its docstring has the compile and the chat template)."""

from phased_jax.paper import paper_config


def get_config():
    return paper_config("llama3-70b", order="oneoff", name="llama3_70b_oneoff")
