"""Against forgetting, Llama-2 7B: phased (1,2,3) under one schedule (not in the paper).

One warmup + cosine decay over the whole run's steps, AdamW state carried across phase
boundaries (`train.schedule_scope=run`): the data is still phased, so against the paper's
phased run this separates "ordering the data" from "restarting the learning rate each phase".
2% of each stage is held out for the forgetting matrix; train the baselines with the same
split to compare them (`phased-jax compare`):
    phased-jax train --config configs/llama2_7b_phased.py --config.data.eval_fraction=0.02
"""

from phased_jax.paper import FORGETTING_EVAL_FRACTION, paper_config


def get_config():
    c = paper_config("llama2-7b", order="1,2,3", name="llama2_7b_run_schedule")
    c.train.schedule_scope = "run"
    c.data.eval_fraction = FORGETTING_EVAL_FRACTION
    return c
