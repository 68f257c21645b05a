"""The demo's base model: pretrained once, published atomically, reused while its inputs hold.

The key is a hash of everything the base depends on: the corpus file, the tokenizer files, the
pretraining config (model, data, train sections) and the corpus generator's version. The base
directory (`<out>/base`) holds the HF export and `base_key.json`; it appears whole or not at all
(`phased_jax.atomic_dir`), so a killed build leaves the old base or none, never half of one.
A run whose key matches a complete base skips pretraining; any change to an input rebuilds it.
The pretraining run itself lives in `<out>/pretrain-<key>` (resumable like any run).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from phased_jax import hf
from phased_jax.atomic_dir import atomic_directory
from phased_jax.demo.corpus import CORPUS_VERSION
from phased_jax.train.runner import run

KEY_FILE = "base_key.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def base_key(cfg: ConfigDict) -> str:
    """Hex digest of the base's inputs (see the module docstring)."""
    h = hashlib.sha256(f"corpus-v{CORPUS_VERSION}\0".encode())
    for path in cfg.data.paths:
        h.update(Path(path).read_bytes())
    tok = Path(cfg.data.tokenizer)
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            h.update(name.encode() + b"\0" + (tok / name).read_bytes())
    sections = {k: cfg[k].to_dict() for k in ("model", "data", "train")}
    for k in ("paths", "tokenizer", "cache_dir"):  # where files are, not what they hold
        sections["data"].pop(k)
    sections["seed"] = cfg.seed
    h.update(json.dumps(sections, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cached(base_dir: Path, key: str) -> bool:
    """Whether `base_dir` holds a complete base built from inputs with this key."""
    try:
        stored = json.loads((base_dir / KEY_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return stored == key and hf.export_complete(base_dir)


def build_base(cfg: ConfigDict, base_dir: Path) -> dict[str, Any]:
    """The base for pretraining config `cfg` in `base_dir`: reused, or pretrained and published.

    `cfg.output_dir` and `cfg.export.hf_dir` are set here from the key. Returns {"key",
    "reused", "dir", "run_dir", "metrics_jsonl"}.
    """
    key = base_key(cfg)
    run_dir = base_dir.parent / f"pretrain-{key}"
    info = {"key": key, "dir": str(base_dir), "run_dir": str(run_dir),
            "metrics_jsonl": str(run_dir / "logs" / "metrics.jsonl")}
    if cached(base_dir, key):
        print(f"base model: reusing {base_dir} (inputs unchanged, key {key})")
        return {**info, "reused": True}
    cfg = ConfigDict(cfg.to_dict())
    cfg.output_dir = str(run_dir)
    cfg.export.hf_dir = str(run_dir / "hf")
    run(cfg)
    with atomic_directory(base_dir, overwrite=True) as tmp:
        for f in Path(cfg.export.hf_dir).iterdir():
            shutil.copy2(f, tmp / f.name)
        (tmp / KEY_FILE).write_text(json.dumps({"key": key, "pretrain_run": str(run_dir)}) + "\n")
    print(f"base model: pretrained and saved to {base_dir} (key {key})")
    return {**info, "reused": False}
