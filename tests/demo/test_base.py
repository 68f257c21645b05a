"""The base model's cache key: it changes with every input of the base and only with those."""

import json

from phased_jax.demo import base
from phased_jax.demo.config import pretrain_config


def _setup(tmp_path, name="out"):
    out = tmp_path / name
    (out / "data").mkdir(parents=True)
    (out / "data" / "corpus.jsonl").write_text('{"id": "d", "output": "abc backwards is cba."}\n')
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text('{"model": 1}')
    return out


def test_key_follows_the_inputs_not_the_paths(tmp_path):
    out = _setup(tmp_path)
    key = base.base_key(pretrain_config(str(out)))
    assert base.base_key(pretrain_config(str(out))) == key  # stable
    elsewhere = _setup(tmp_path, "elsewhere")  # same contents, other folder
    assert base.base_key(pretrain_config(str(elsewhere), run_dir="x")) == key
    cfg = pretrain_config(str(out))
    cfg.train.lr = 1e-3
    assert base.base_key(cfg) != key
    cfg = pretrain_config(str(out))
    cfg.model.num_layers = 4
    assert base.base_key(cfg) != key
    (out / "tokenizer" / "tokenizer.json").write_text('{"model": 2}')
    assert base.base_key(pretrain_config(str(out))) != key
    (elsewhere / "data" / "corpus.jsonl").write_text('{"id": "d", "output": "other."}\n')
    assert base.base_key(pretrain_config(str(elsewhere))) != key


def test_cached_needs_the_same_key_and_a_complete_export(tmp_path):
    d = tmp_path / "base"
    assert not base.cached(d, "k")
    d.mkdir()
    (d / base.KEY_FILE).write_text(json.dumps({"key": "k"}))
    assert not base.cached(d, "k")  # no export in it


def test_runs_tuned_from_another_base_are_started_again(tmp_path):
    from phased_jax.demo.__main__ import seed_dir_for

    d = seed_dir_for(tmp_path, 0, "k1")
    (d / "phased").mkdir()
    assert seed_dir_for(tmp_path, 0, "k1") == d and (d / "phased").is_dir()  # same base: kept
    assert seed_dir_for(tmp_path, 0, "k2") == d and not (d / "phased").exists()  # new base
    assert (d / "base_key.txt").read_text() == "k2\n"
