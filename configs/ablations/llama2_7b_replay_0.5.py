"""Against forgetting, Llama-2 7B: phased (1,2,3) with replay 0.5 (not in the paper).

Phase k > 1 also trains on round(0.5 x n_k) records drawn from the earlier phases' training
records. 2% of each stage is held out for the forgetting matrix (`forgetting.md`); train the
baselines with the same split to compare them (`phased-jax compare`):
    phased-jax train --config configs/llama2_7b_phased.py --config.data.eval_fraction=0.02
"""

from phased_jax.paper import FORGETTING_EVAL_FRACTION, paper_config


def get_config():
    c = paper_config("llama2-7b", order="1,2,3", name="llama2_7b_replay_0.5")
    c.data.replay = 0.5
    c.data.eval_fraction = FORGETTING_EVAL_FRACTION
    return c
