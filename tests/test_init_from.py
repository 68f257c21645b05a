"""Your own model: `model.preset="auto"` takes the shape from `model.init_from`; a named preset
is checked against it before any data; `convert --random` makes a model to try it on."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from phased_jax.cli import main as cli_main

USER_CONFIG = """
from phased_jax.config import get_default_config, model_section


def get_config():
    c = get_default_config()
    c.model = model_section({preset!r}, dtype="float32")
    c.model.init_from = {init_from!r}
    c.data.paths = ("no-data-is-read.jsonl",)
    c.data.max_length = 64
    c.train.global_batch = 8
    return c
"""


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> dict[str, Path]:
    """A random 3-layer model (not any preset's shape) in HF format, with a tokenizer of 300."""
    import jax

    from phased_jax.data.toy_tokenizer import build_tokenizer
    from phased_jax.hf import save
    from phased_jax.model.config import get_preset
    from phased_jax.model.params import init_params

    root = tmp_path_factory.mktemp("own_model")
    build_tokenizer(["a small corpus of words, numbers 1 2 3"] * 10, 300, root / "tok")
    cfg = get_preset("tiny-mistral").replace(num_layers=3, vocab_size=320)  # no preset's shape
    hf = root / "hf"
    save(hf, cfg, init_params(cfg, jax.random.key(3)), tokenizer=root / "tok")
    return {"hf": hf, "tok": root / "tok", "root": root}


def _config(tmp_path: Path, preset: str, init_from: Path) -> Path:
    path = tmp_path / "mine.py"  # outside the repository, as a user's file is
    path.write_text(USER_CONFIG.format(preset=preset, init_from=str(init_from)))
    return path


def test_random_model_is_a_preset_with_the_tokenizers_ids(tmp_path, random_model, capsys):
    from phased_jax.data.tokens import load_tokenizer

    out = tmp_path / "r"
    assert cli_main(["convert", "--random", "--preset", "tiny-llama", "--tokenizer",
                     str(random_model["tok"]), str(out)]) == 0
    assert f"wrote {out}: llama in HF format, tokenizer from {random_model['tok']}" in \
        capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    tok = load_tokenizer(str(out))
    assert cfg["vocab_size"] == len(tok) > 256  # raised from the preset's 256 to the tokenizer's
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (2, 64)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # a real HF model
    assert model.config.num_hidden_layers == 2


def test_convert_random_usage_errors(tmp_path, capsys):
    assert cli_main(["convert", "--random", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert cli_main(["convert", str(tmp_path / "only-one")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("phased-jax convert: error: ") for line in err)


def test_convert_to_hf_says_when_it_writes_no_tokenizer(tmp_path, random_model, capsys):
    ckpt = tmp_path / "ckpt"
    assert cli_main(["convert", str(random_model["hf"]), str(ckpt)]) == 0
    assert "3 tokenizer files" in capsys.readouterr().out
    assert cli_main(["convert", str(ckpt), str(tmp_path / "back")]) == 0
    assert f"tokenizer from {ckpt}/tokenizer" in capsys.readouterr().out
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    import shutil

    shutil.rmtree(ckpt / "tokenizer")
    assert cli_main(["convert", str(ckpt), str(tmp_path / "bare")]) == 0
    assert "no tokenizer (none in" in capsys.readouterr().out
    assert not (tmp_path / "bare" / "tokenizer.json").exists()


@pytest.mark.parametrize("kind", ["hf", "params"])
def test_auto_takes_every_shape_field_from_the_checkpoint(tmp_path, random_model, kind, capsys):
    from phased_jax.config_cli import parse_config_argv
    from phased_jax.hf.hf_config import read_config

    src = random_model["hf"]
    if kind == "params":
        src = tmp_path / "ckpt"
        assert cli_main(["convert", str(random_model["hf"]), str(src)]) == 0
    config = parse_config_argv(["--config", str(_config(tmp_path, "auto", src)),
                                "--config.model.remat_policy=full"], "t", "usage").config
    want = read_config(random_model["hf"])
    assert config.model.num_layers == 3 and config.model.sliding_window == want.sliding_window
    for name in ("vocab_size", "hidden_size", "num_kv_heads", "architecture", "rope_theta",
                 "eos_token_id", "max_position_embeddings"):
        assert config.model[name] == getattr(want, name), name
    # precision, remat and attention stay the config's
    assert (config.model.dtype, config.model.remat_policy) == ("float32", "full")
    assert cli_main(["plan", "--config", str(_config(tmp_path, "auto", src)), "--num-devices", "1"]) == 0
    assert "3" in capsys.readouterr().out


def test_auto_refuses_a_field_that_disagrees(tmp_path, random_model, capsys):
    cfg = _config(tmp_path, "auto", random_model["hf"])
    assert cli_main(["plan", "--config", str(cfg), "--config.model.num_layers=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"model.num_layers=4 differs from 3 in {random_model['hf']}" in err
    # the same value as the checkpoint's is no conflict
    assert cli_main(["plan", "--config", str(cfg), "--config.model.num_layers=3",
                     "--num-devices", "1"]) == 0
    config = _config(tmp_path, "auto", "")
    assert cli_main(["plan", "--config", str(config)]) == 2
    assert "model.preset='auto' takes the model's shape from model.init_from, which is empty" in \
        capsys.readouterr().err


def test_named_preset_mismatch_is_one_line_before_any_data(tmp_path, random_model, capsys):
    """stats would read data.paths (which does not exist); the shape check comes first."""
    cfg = _config(tmp_path, "tiny-mistral", random_model["hf"])
    for command in ("plan", "stats", "train"):
        assert cli_main([command, "--config", str(cfg)]) == 2, command
        err = capsys.readouterr().err.strip()
        assert err == (f"phased-jax {command}: error: model.vocab_size=256 (preset 'tiny-mistral') "
                       f"differs from 320 in model.init_from='{random_model['hf']}': set "
                       "--config.model.preset=auto to take the model's shape from the "
                       "checkpoint, or fix the field"), err


def test_preset_auto_on_the_command_line_of_a_named_config(tmp_path, random_model, capsys):
    """`--config.model.preset=auto` on a config built from a named preset takes the shapes
    the config left at the preset's values from the checkpoint."""
    cfg = _config(tmp_path, "tiny-mistral", random_model["hf"])
    assert cli_main(["plan", "--config", str(cfg), "--config.model.preset=auto",
                     "--num-devices", "1"]) == 0
    # a field the command line changed is the user's, and must agree
    assert cli_main(["plan", "--config", str(cfg), "--config.model.preset=auto",
                     "--config.model.hidden_size=128"]) == 2
    assert "model.hidden_size=128 differs from 64" in capsys.readouterr().err


def test_user_config_text_in_readme_is_this_shape():
    """The README's own user config uses model_section("auto") (the journey test runs it)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert 'c.model = model_section("auto"' in text
    assert "Edit `phased_jax/paper.py`" not in textwrap.dedent(text)
