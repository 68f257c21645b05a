"""The README's demo: a tiny Llama instruction-tuned from the demo's pretrained base.

`make demo` builds the data, the tokenizer and the base model (`demo_out/base`, HF format) and
runs every arm on every seed; to run one arm by hand after it:

    phased-jax train --config configs/demo.py                            # phased, 3 phases
    phased-jax train --config configs/demo.py --config.data.order=oneoff \
        --config.output_dir=demo_out/by_hand/oneoff                      # the one-off baseline
    phased-jax train --config configs/demo.py --config.data.replay=0.5 \
        --config.output_dir=demo_out/by_hand/replay                      # phased + replay

(`phased_jax.demo.config.ARMS` lists every arm's fields; `demo_config(arm=...)` applies them.)
"""

from phased_jax.demo.config import demo_config


def get_config():
    return demo_config()
