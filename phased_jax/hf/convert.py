"""`phased-jax convert SRC DST`: an HF directory <-> a params Orbax checkpoint training starts from.

The direction follows from SRC (config.json: HF -> Orbax; model_config.json: Orbax -> HF) unless
`--to` says. Tokenizer files travel along: HF -> Orbax copies them to DST/tokenizer/, and
Orbax -> HF writes them from --tokenizer or, by default, SRC/tokenizer/ (and says when there is
none). `--random --preset NAME --tokenizer DIR DST` writes a random model of a preset in HF
format, with that tokenizer, to try the workflow on. `--adapter DIR SRC DST` merges a PEFT LoRA
adapter into the base SRC (either kind): DST is the full model W + (alpha / r) B A, in HF format
unless `--to orbax`, so that anything that reads plain weights (transformers, vLLM, our
`generate --hf`) runs the fine-tuned model. Either way DST appears
complete or not at all, and `--overwrite` removes the old DST only once the new one is complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
from safetensors import safe_open

from phased_jax.data.tokens import load_tokenizer, pad_id_of
from phased_jax.errors import CheckpointError, UsageError
from phased_jax.hf.from_hf import load
from phased_jax.hf.hf_config import read_config
from phased_jax.hf.peft import ADAPTER_WEIGHTS, AdapterError, load_adapter, to_peft
from phased_jax.hf.peft import merge as peft_merge
from phased_jax.hf.to_hf import save, tokenizer_files
from phased_jax.local_paths import check_convert
from phased_jax.model.config import PRESETS, ModelConfig, get_preset
from phased_jax.model.lora import LoraSpec
from phased_jax.model.params import init_params
from phased_jax.params_checkpoint import CONFIG_FILE, load_params, read_model_config, save_params

TOKENIZER_DIR = "tokenizer"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phased-jax convert",
        description="Convert a Hugging Face Llama/Mistral directory (config.json + safetensors) "
                    "to a params Orbax checkpoint (DST/params/ + DST/model_config.json), or back.")
    p.add_argument("src", type=Path, nargs="?",
                   help="input: an HF model directory or a params checkpoint (none with --random)")
    p.add_argument("dst", type=Path, help="output directory (must not exist or be empty, "
                                          "unless --overwrite)")
    p.add_argument("--random", action="store_true",
                   help="write a randomly initialised --preset model in HF format (no SRC): a "
                        "small model of your own to try the workflow on")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny-llama",
                   help="--random: the model's shapes (default: tiny-llama)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="--random: vocabulary size (default: the preset's, raised to the "
                        "--tokenizer's size)")
    p.add_argument("--seed", type=int, default=0, help="--random: initialisation seed")
    p.add_argument("--adapter", type=Path, metavar="DIR",
                   help="merge this PEFT LoRA adapter (adapter_config.json + "
                        "adapter_model.safetensors, e.g. a LoRA run's RUN/adapter or "
                        "RUN/phases/PHASE) into SRC, its base: DST is the full model "
                        "W + (alpha / r) B A, in HF format unless --to orbax")
    p.add_argument("--to", choices=("hf", "orbax"),
                   help="output format (default: the opposite of what SRC holds; with "
                        "--adapter, hf)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written params (default: the input's)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="HF output: largest safetensors file, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="HF output: directory of tokenizer files to include "
                        f"(default: SRC/{TOKENIZER_DIR}/ if present)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="HF input: allow pytorch_model*.bin pickle weights (they can run code; "
                        "only for files you trust)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def detect_direction(src: Path) -> str:
    if (src / "config.json").is_file():
        return "orbax"
    if (src / CONFIG_FILE).is_file():
        return "hf"
    raise CheckpointError(f"{src}: holds neither config.json (HF) nor {CONFIG_FILE} (params "
                          "checkpoint); pass the right directory or --to")


def hf_to_orbax(args: argparse.Namespace) -> None:
    model, params = load(args.src, dtype=args.dtype, allow_pickle=args.allow_pickle)
    files = tokenizer_files(args.src, TOKENIZER_DIR)
    save_params(args.dst, model.cfg, params, overwrite=args.overwrite, extra_files=files)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"wrote {args.dst}: {model.cfg.architecture}, {n / 1e6:.1f}M params "
          f"({model.cfg.param_dtype}), "
          + (f"{len(files)} tokenizer files" if files else f"no tokenizer ({args.src} has none)"))


def orbax_to_hf(args: argparse.Namespace) -> None:
    cfg, params = load_params(args.src)
    tokenizer = args.tokenizer
    if tokenizer is None and (args.src / TOKENIZER_DIR).is_dir():
        tokenizer = args.src / TOKENIZER_DIR
    write_hf(args, cfg, params, tokenizer)


def write_hf(args: argparse.Namespace, cfg: ModelConfig, params: dict,
             tokenizer: Path | None) -> None:
    save(args.dst, cfg, params, tokenizer=tokenizer, dtype=args.dtype,
         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {args.dst}: {cfg.architecture} in HF format, "
          + (f"tokenizer from {tokenizer}" if tokenizer else
             f"no tokenizer (none in {args.src}/{TOKENIZER_DIR}/; pass --tokenizer DIR to "
             "include one)" if args.src else "no tokenizer (pass --tokenizer DIR to include one)"))


def read_adapter(directory: str | Path, cfg: ModelConfig, base: str,
                 field: str = "--adapter") -> tuple[LoraSpec, dict]:
    """(spec, adapters) of a PEFT adapter directory for the base `base` of config `cfg`. Every
    way it cannot be used is one UsageError line (exit 2): an AdapterError (the file and field),
    and a tensor that does not fit the base (named with both shapes) or has no place in it (an
    adapter of a deeper model would otherwise be cut to the base's layers without a word)."""
    d = Path(directory)
    weights = str(d / ADAPTER_WEIGHTS)
    other = (f"is it an adapter of another model? The base {base} has {cfg.num_layers} "
             f"layers, hidden_size {cfg.hidden_size}: give the base it was trained on")
    try:
        spec, adapters = load_adapter(d, cfg)
    except AdapterError as e:  # the weights' errors are tensors that do not fit the base
        raise UsageError(f"{field} {e}" + (f"; {other}" if str(e).startswith(weights) else "")
                         ) from None
    with safe_open(weights, "numpy") as f:
        extra = sorted(set(f.keys()) - set(to_peft(cfg, spec, adapters)))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UsageError(f"{field} {weights}: tensor {extra[0]}{more} has no place in the "
                         f"base; {other}")
    return spec, adapters


def merge_adapter(args: argparse.Namespace) -> None:
    """SRC (an HF directory or a params checkpoint) with --adapter merged in, in --dtype or
    SRC's: the base is read in that dtype and the float32 update added with one rounding, as
    peft's `merge_and_unload()` does on a model loaded in it. The adapter is checked against
    SRC's config before any weight is read."""
    hf_base = detect_direction(args.src) == "orbax"
    cfg = read_config(args.src) if hf_base else read_model_config(args.src)
    spec, adapters = read_adapter(args.adapter, cfg, str(args.src))
    if hf_base:
        model, base = load(args.src, dtype=args.dtype, allow_pickle=args.allow_pickle)
        cfg, own_tokenizer = model.cfg, args.src if tokenizer_files(args.src) else None
    else:
        cfg, base = load_params(args.src)
        if args.dtype:
            cfg = cfg.replace(param_dtype=args.dtype)
            base = jax.tree.map(lambda x: x.astype(args.dtype), base)
        own = args.src / TOKENIZER_DIR
        own_tokenizer = own if own.is_dir() else None
    merged = peft_merge(cfg, spec, base, adapters)  # peft's order and roundings, on the host
    del base
    tokenizer = args.tokenizer or own_tokenizer
    if args.to == "orbax":
        save_params(args.dst, cfg, merged, overwrite=args.overwrite,
                    extra_files=tokenizer_files(tokenizer or "", TOKENIZER_DIR))
    else:
        save(args.dst, cfg, merged, tokenizer=tokenizer, dtype=cfg.param_dtype,
             max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {args.dst}: {cfg.architecture} with the LoRA adapter {args.adapter} merged "
          f"(r={spec.rank}, alpha={spec.alpha:g}, {', '.join(spec.targets)}), "
          f"{'a params checkpoint' if args.to == 'orbax' else 'in HF format'} "
          f"({cfg.param_dtype}), "
          + (f"tokenizer from {tokenizer}" if tokenizer else
             f"no tokenizer (none in {args.src}; pass --tokenizer DIR to include one)"))


def random_hf(args: argparse.Namespace) -> None:
    """A randomly initialised model of a preset (seeded, the preset's initializer_range), in
    HF format: a small model of your own to walk the workflow with."""
    cfg = get_preset(args.preset, param_dtype=args.dtype or "float32",
                     dtype=args.dtype or "float32")
    if args.vocab_size:
        cfg = cfg.replace(vocab_size=args.vocab_size)
    if args.tokenizer is not None:
        cfg = _with_tokenizer_ids(cfg, args.tokenizer)
    params = init_params(cfg, jax.random.key(args.seed))
    write_hf(args, cfg, params, args.tokenizer)


def _with_tokenizer_ids(cfg: ModelConfig, directory: Path) -> ModelConfig:
    """`cfg` with the tokenizer's vocabulary size (if larger) and BOS/EOS/pad ids, so that the
    random model and its tokenizer agree."""
    tok = load_tokenizer(str(directory), "--tokenizer")
    vocab = max(cfg.vocab_size, len(tok))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": pad_id_of(tok)}
    return cfg.replace(vocab_size=vocab, **{k: v for k, v in ids.items() if v is not None})


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed why
        return int(e.code or 0)
    check_convert(args)  # SRC missing or DST a file: one line, before anything is read
    if args.random and args.src is not None:
        raise UsageError("--random writes a new model: give only DST, not SRC and DST")
    if args.random and args.adapter is not None:
        raise UsageError("--adapter merges an adapter into SRC, its base: give SRC DST, "
                         "not --random")
    if not args.random and args.src is None:
        raise UsageError("give SRC DST to convert, or --random DST (with --preset and "
                         "--tokenizer) to write a random model")
    direction = "hf" if args.random else args.to or detect_direction(args.src)
    if args.dst.exists() and any(args.dst.iterdir()) and not args.overwrite:
        raise CheckpointError(f"{args.dst}: already exists and is not empty; choose another "
                              "output or pass --overwrite")
    if args.random:
        if args.to == "orbax":
            raise UsageError("--random writes a Hugging Face directory; convert it with a "
                             "second `phased-jax convert` for a params checkpoint")
        random_hf(args)
    elif args.adapter is not None:
        merge_adapter(args)
    elif direction == "orbax":
        hf_to_orbax(args)
    else:
        orbax_to_hf(args)
    return 0
