"""`phased-jax convert SRC DST`: an HF directory <-> a params Orbax checkpoint training starts from.

The direction follows from SRC (config.json: HF -> Orbax; model_config.json: Orbax -> HF) unless
`--to` says. Tokenizer files travel along: HF -> Orbax copies them to DST/tokenizer/, and
Orbax -> HF writes them from --tokenizer or, by default, SRC/tokenizer/. Either way DST appears
complete or not at all, and `--overwrite` removes the old DST only once the new one is complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from phased_jax.errors import CheckpointError
from phased_jax.hf.from_hf import load
from phased_jax.hf.to_hf import TOKENIZER_FILES, save
from phased_jax.params_checkpoint import CONFIG_FILE, load_params, save_params

TOKENIZER_DIR = "tokenizer"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phased-jax convert",
        description="Convert a Hugging Face Llama/Mistral directory (config.json + safetensors) "
                    "to a params Orbax checkpoint (DST/params/ + DST/model_config.json), or back.")
    p.add_argument("src", type=Path, help="input: an HF model directory or a params checkpoint")
    p.add_argument("dst", type=Path, help="output directory (must not exist or be empty, "
                                          "unless --overwrite)")
    p.add_argument("--to", choices=("hf", "orbax"),
                   help="output format (default: the opposite of what SRC holds)")
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
    tokenizer_files = [args.src / f for f in TOKENIZER_FILES if (args.src / f).is_file()]
    save_params(args.dst, model.cfg, params, overwrite=args.overwrite,
                extra_files={f"{TOKENIZER_DIR}/{f.name}": f for f in tokenizer_files})
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"wrote {args.dst}: {model.cfg.architecture}, {n / 1e6:.1f}M params "
          f"({model.cfg.param_dtype}), {len(tokenizer_files)} tokenizer files")


def orbax_to_hf(args: argparse.Namespace) -> None:
    cfg, params = load_params(args.src)
    tokenizer = args.tokenizer
    if tokenizer is None and (args.src / TOKENIZER_DIR).is_dir():
        tokenizer = args.src / TOKENIZER_DIR
    save(args.dst, cfg, params, tokenizer=tokenizer, dtype=args.dtype,
         max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {args.dst}: {cfg.architecture} in HF format"
          + (f" with tokenizer from {tokenizer}" if tokenizer else ""))


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse has printed why
        return int(e.code or 0)
    direction = args.to or detect_direction(args.src)
    if args.dst.exists() and any(args.dst.iterdir()) and not args.overwrite:
        raise CheckpointError(f"{args.dst}: already exists and is not empty; choose another "
                              "output or pass --overwrite")
    if direction == "orbax":
        hf_to_orbax(args)
    else:
        orbax_to_hf(args)
    return 0
