"""The experiment config: one ConfigDict tree, every number of a run in one place.

Experiment files in `configs/` start from `get_default_config()` and change what their
experiment changes; any field can be overridden on the command line
(`--config.train.lr=1e-5`). Each section's defaults are the paper's settings where the paper
fixes them (DESIGN.md section 1). Each part of the code takes its own section: `data` the
pipeline, `model` the decoder, `train` the optimizer and step, `mesh` the sharding,
`checkpoint` the run checkpoints, `export` the HF export. `config_checks` validates them,
`config_cli` reads them from a command line.
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict, config_dict

from phased_jax.init_from import AUTO, CHECKPOINT_FIELDS, RUN_FIELDS
from phased_jax.model.config import ModelConfig, get_preset
from phased_jax.model.lora import TARGETS

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}

TRAINING_PRECISION = {"dtype": "bfloat16", "param_dtype": "float32"}


def model_section(preset: str, **overrides) -> ConfigDict:
    """All fields of a model preset as a ConfigDict, so each is overridable from the command line.

    The model's `dtype` (activations and matmuls) and `param_dtype` (stored parameters and
    gradients) are the run's one precision knob: bfloat16 compute over float32 parameters
    unless `overrides` say otherwise. Preset `auto` leaves every shape field empty (typed, so
    still overridable) for `init_from.resolve_model` to fill from `model.init_from`. The
    `lora` sub-section (`lora_section`) is no ModelConfig field: `model_config` drops it.
    """
    if preset == AUTO:
        run = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in RUN_FIELDS}
        section = ConfigDict({**run, **TRAINING_PRECISION})
        types = {f.name: _TYPES[f.type] for f in dataclasses.fields(ModelConfig)}
        for name in CHECKPOINT_FIELDS:
            section[name] = config_dict.placeholder(types[name])
        section.update(overrides)
    else:
        section = ConfigDict(get_preset(preset, **{**TRAINING_PRECISION, **overrides}).to_dict())
    section.preset = preset
    section.init_from = ""  # HF directory or Orbax checkpoint to start from; "" = random init
    section.lora = lora_section()
    return section


def lora_section() -> ConfigDict:
    """`model.lora`: LoRA / QLoRA adapters on a frozen base (`phased_jax.model.lora`); off by
    default, the paper's full fine-tuning. Read with `model.lora.spec_from_section`."""
    section = ConfigDict()
    section.rank = 0  # adapter rank r; 0 = off (the paper's full fine-tuning)
    section.alpha = 16.0  # the update is (alpha / r) * B A, as PEFT scales it
    section.dropout = 0.0  # dropout on the adapters' input, in [0, 1)
    # Comma-separated short names (q, k, v, o, gate, up, down), or else one regex over the
    # modules' Hugging Face names, e.g. "self_attn\\..*" for the attention projections.
    section.targets = ",".join(TARGETS)
    # "" = the base stored in model.param_dtype; "int8" | "nf4": QLoRA, the frozen base quantised
    section.base_qtype = ""
    # True: merge the adapters into the base at each phase end and start fresh ones
    section.merge_each_phase = False
    section.init_from = ""  # a PEFT adapter directory to start the adapters from; "" = PEFT's init
    return section


def model_config(section: ConfigDict) -> ModelConfig:
    """The ModelConfig a `model` section describes."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig.from_dict({k: v for k, v in section.to_dict().items() if k in fields})


def get_default_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "default"
    c.output_dir = "runs/default"
    c.seed = 3517

    c.model = model_section("tiny-llama")

    c.data = ConfigDict()
    c.data.paths = ()  # files, directories or HF dataset names (see phased_jax.data.records)
    c.data.format = "auto"  # auto | alpaca | authors | scored | jsonl | hf | messages | sharegpt
    c.data.hf_split = "train"  # split of a Hugging Face dataset in data.paths
    c.data.fields = ConfigDict(dict(instruction="instruction", input="input", output="output",
                                    score="score", id="id", messages="messages",
                                    conversations="conversations"))
    c.data.on_invalid = "error"  # error | skip (skipped records are listed in a report)
    # A JSONL line (or JSON-list element) longer than this is a bad record, refused before it is
    # parsed or tokenised: one 50 MB line once took 10 GB and 90 s to tokenise. Real
    # instructions are a few KB; raise it only for data that needs it.
    c.data.max_record_bytes = 1_000_000
    c.data.thresholds = (1.5, 3.5)  # phase k holds scores in [t_{k-1}, t_k); the paper's three phases
    c.data.quantiles = 0  # >0: K phases of equal size by score quantile instead of thresholds
    c.data.order = "1,2,3"  # "1,2,3" phased | "oneoff" | "2,1,3" | "random" | "3" | "1+3" ...
    c.data.template = "authors"  # authors | alpaca | chat
    c.data.tokenizer = ""  # local HF tokenizer directory
    c.data.max_length = 2048
    c.data.packing = False  # several examples per row, attention kept within each (segment ids)
    c.data.eval_path = ""  # held-out records for eval loss; "" = none
    # Hold out this fraction of each difficulty *stage* (chosen by seed and record id, so the
    # same records whatever data.order is): each phase end evaluates every stage's held-out
    # split, the forgetting matrix (<output_dir>/forgetting.md). 0 = none.
    c.data.eval_fraction = 0.0
    # Phase k > 1 also trains on round(replay * n_k) examples drawn (seeded) from the earlier
    # phases' training examples, against forgetting. 0 = none (the paper).
    c.data.replay = 0.0
    c.data.cache_dir = ""  # tokenisation cache; "" = <output_dir>/token_cache
    c.data.shuffle = True  # seeded per (seed, phase, epoch); False keeps read order

    c.train = ConfigDict()
    c.train.global_batch = 128
    c.train.grad_accum = 1
    c.train.epochs_per_phase = 2
    c.train.max_steps_per_phase = -1  # >0 caps each phase (smoke runs); -1 = epochs decide
    c.train.lr = 5e-6
    c.train.warmup_ratio = 0.1
    c.train.schedule = "cosine"  # cosine | linear | constant
    c.train.min_lr_ratio = 0.0
    c.train.weight_decay = 0.1
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.clip_norm = 1.0
    c.train.z_loss = 0.0  # >0: adds z_loss * logsumexp(logits)^2 per response token (PaLM uses 1e-4)
    # >0: the LM head and loss run this many positions at a time (rematerialised), so the
    # [batch, L, vocab] f32 logits are never all live; a ragged last chunk is fine. 0 = off.
    c.train.loss_chunk = 0
    c.train.opt_state_dtype = ""  # Adam moments; "" = same as param_dtype
    # "phase" (the paper): a fresh optimizer and warmup + decay per phase. "run": one warmup +
    # decay over the whole run's steps, optimizer state carried across phase boundaries.
    c.train.schedule_scope = "phase"
    c.train.log_every = 10
    c.train.eval_every = 0  # >0: also eval every this many global steps; 0: at phase ends only
    c.train.peak_flops = 0.0  # per device, for MFU where the device kind is unknown (CPU); 0 = probe
    c.train.tensorboard = True  # event files in <output_dir>/tensorboard (also metrics.jsonl)
    # Weights & Biases (phased_jax/train/tracking.py; pip install 'phased-jax[wandb]'): the
    # TensorBoard scalars, the config, phase boundaries and eval losses; files under
    # <output_dir>/logs/wandb, run id in <output_dir>/logs/wandb_run_id (a resumed run keeps it).
    c.train.wandb = ConfigDict()
    c.train.wandb.project = ""  # "" = W&B off
    c.train.wandb.entity = ""  # "" = your default entity
    c.train.wandb.name = ""  # "" = config.name
    c.train.wandb.tags = ()
    c.train.wandb.mode = ""  # "" = WANDB_MODE or W&B's default (online); offline | online | disabled

    c.mesh = ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor) within a slice; -1 = the rest of the devices
    c.mesh.dcn_shape = (1, 1, 1)  # across slices (multi-slice pods)
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("layers", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    )

    c.checkpoint = ConfigDict()
    c.checkpoint.dir = ""  # "" = <output_dir>/checkpoints; gs:// paths work
    c.checkpoint.every_steps = 500
    c.checkpoint.keep = 3  # rolling checkpoints; phase-end checkpoints are always kept
    c.checkpoint.async_save = True
    c.checkpoint.phase_params = True  # also save each phase's params under <output_dir>/phases/
    c.checkpoint.restore_retries = 3  # a checkpoint that cannot be read is retried this often
    c.checkpoint.retry_backoff_s = 1.0  # first wait between tries; doubles each time
    # When none of several checkpoints reads (likelier a storage outage than corruption):
    # "stop" (one line, exit 1, nothing moved) or "restart" (set them aside, train from step 0)
    c.checkpoint.on_unreadable = "stop"

    c.export = ConfigDict()
    c.export.hf_dir = ""  # "" = <output_dir>/hf
    c.export.at_end = True
    c.export.dtype = "bfloat16"
    # LoRA runs (model.lora.rank > 0): "merged" = a full HF model, base + scale * B A in
    # export.dtype; "adapter" = a PEFT adapter directory (adapter_config.json + safetensors);
    # "both". Ignored without LoRA.
    c.export.lora = "merged"
    return c
