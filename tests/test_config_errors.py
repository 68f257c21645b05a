"""A config mistake is found before any data is read: `validate_config` names the field, and
every command-line or config-file mistake is one line on stderr with exit status 2."""

from __future__ import annotations

import re

import pytest
from ml_collections import ConfigDict

from phased_jax.cli import main as cli_main
from phased_jax.config import get_default_config, lora_section, model_config
from phased_jax.config_checks import validate_config
from phased_jax.config_cli import parse_config_argv
from phased_jax.errors import ConfigError
from phased_jax.model.lora import LoraSpec, spec_from_section

GOOD = '''
from phased_jax.config import get_default_config

def get_config():
    c = get_default_config()
    c.data.paths = ("data.jsonl",)
    c.output_dir = {out!r}
    return c
'''


def valid():
    c = get_default_config()
    c.data.paths = ("data.jsonl",)
    return c


def test_default_config_with_data_is_valid():
    validate_config(valid())
    with pytest.raises(ConfigError, match=r"data\.paths=\(\) is invalid"):
        validate_config(get_default_config())  # no data to train on


INVALID = [  # (field, value, what the message must also say)
    ("data.thresholds", (0.5, 9.0), r"increase strictly and lie in \(1, 5\]"),
    ("data.thresholds", (3.5, 1.5), "increase strictly"),
    ("data.thresholds", (1.5, 1.5), "increase strictly"),
    ("data.thresholds", (1.0, 3.5), r"lie in \(1, 5\]"),
    ("data.thresholds", ("a",), "tuple of scores"),
    ("train.lr", 0.0, "> 0"),
    ("train.lr", -1e-5, "> 0"),
    ("train.warmup_ratio", 1.5, r"in \[0, 1\]"),
    ("train.warmup_ratio", -0.1, r"in \[0, 1\]"),
    ("train.epochs_per_phase", 0, ">= 1"),
    ("train.grad_accum", 0, ">= 1"),
    ("train.global_batch", 0, ">= 1"),
    ("train.max_steps_per_phase", 0, "-1 for no cap"),
    ("data.max_length", 1, ">= 2"),
    ("data.max_record_bytes", 0, ">= 1"),
    ("data.eval_fraction", 1.0, r"in \[0, 1\)"),
    ("data.quantiles", -1, ">= 0"),
    ("data.template", "chatml", "'authors', 'alpaca', 'chat'"),
    ("data.format", "csv", "'auto', 'alpaca', 'authors', 'scored', 'jsonl', 'hf'"),
    ("data.on_invalid", "ignore", "'error', 'skip'"),
    ("train.schedule", "cos", "'cosine', 'linear', 'constant'"),
    ("model.dtype", "fp8", "'bfloat16'"),
    ("export.dtype", "int8", "'float32'"),
    ("checkpoint.keep", 0, ">= 1"),
]


@pytest.mark.parametrize(("field", "value", "why"), INVALID,
                         ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_field_is_named_with_its_value(field, value, why):
    c = valid()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    msg = str(e.value)
    assert msg.startswith(f"{field}={value!r} is invalid")
    assert f"--config.{field}=" in msg  # what to do
    assert re.search(why, msg), msg


@pytest.mark.parametrize(("order", "why"), [
    ("1,,3", r"'' is not a stage like '2' or '1\+3'"),
    ("1,4", r"stage 4 outside 1\.\.3 \(data\.thresholds or data\.quantiles make 3 stages\)"),
    ("1,1", "stage 1 appears twice"),
    ("first", "'first' is not a stage.*'oneoff' or 'random'"),
])
def test_order_syntax(order, why):
    c = valid()
    c.data.order = order
    with pytest.raises(ConfigError, match=rf"^data\.order '{order}': {why}"):
        validate_config(c)


def test_batch_must_divide_into_micro_batches():
    c = valid()
    c.train.global_batch, c.train.grad_accum = 10, 3
    with pytest.raises(ConfigError, match=r"train\.global_batch=10 is not divisible by "
                                          r"train\.grad_accum=3"):
        validate_config(c)


def test_model_section_is_checked():
    c = valid()
    c.model.remat_policy = "everything"
    with pytest.raises(ConfigError, match=r"config\.model: .*remat_policy 'everything'"):
        validate_config(c)
    c = valid()
    c.model.attention_block_q = 100
    with pytest.raises(ConfigError, match=r"attention_block_q \(100\) must be a positive multiple of 128"):
        validate_config(c)


def test_cudnn_attention_refuses_packed_rows():
    c = valid()
    c.model.attention_impl = "cudnn"
    validate_config(c)  # one example a row: cuDNN's causal + length mask says it
    c.data.packing = True
    with pytest.raises(ConfigError, match=r"attention_impl='cudnn' cannot express packed segments"):
        validate_config(c)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.py"
    path.write_text(GOOD.format(out=str(tmp_path / "run")))
    return path


def usage_error(capsys, argv: list[str], command: str = "train") -> str:
    """Run `phased-jax COMMAND ARGV`; assert exit 2 and one line on stderr; return it."""
    assert cli_main([command, *argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"phased-jax {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not out
    return err


def test_missing_config_file(tmp_path, capsys):
    err = usage_error(capsys, ["--config", str(tmp_path / "nope.py")])
    assert f"--config {tmp_path / 'nope.py'}: no such file" in err


def test_config_is_a_directory(tmp_path, capsys):
    err = usage_error(capsys, ["--config", str(tmp_path)], "stats")
    assert f"--config {tmp_path}: is a directory" in err


def test_config_without_get_config(tmp_path, capsys):
    path = tmp_path / "c.py"
    path.write_text("LR = 1e-5\n")
    assert "defines no get_config()" in usage_error(capsys, ["--config", str(path)])


def test_config_that_raises_on_import(tmp_path, capsys):
    path = tmp_path / "c.py"
    path.write_text("import os\n\nPATHS = os.environ['NO_SUCH_VARIABLE_HOPEFULLY']\n")
    err = usage_error(capsys, ["--config", str(path)])
    assert f"--config {path}:3: importing it failed: KeyError: 'NO_SUCH_VARIABLE_HOPEFULLY'" in err


def test_config_with_a_syntax_error(tmp_path, capsys):
    path = tmp_path / "c.py"
    path.write_text("def get_config(:\n    pass\n")
    err = usage_error(capsys, ["--config", str(path)], "stats")
    assert f"--config {path}: importing it failed: SyntaxError" in err and "line 1" in err


def test_get_config_with_a_bad_value_type(tmp_path, capsys):
    path = tmp_path / "c.py"
    path.write_text("from phased_jax.config import get_default_config\n\ndef get_config():\n"
                    "    c = get_default_config()\n    c.train.lr = 'fast'\n    return c\n")
    err = usage_error(capsys, ["--config", str(path)])
    assert f"--config {path}:5: get_config() failed: TypeError" in err


def test_unknown_override_suggests_the_field(good, capsys):
    err = usage_error(capsys, ["--config", str(good), "--config.train.lrr=1"])
    assert "--config.train.lrr=1: the config has no field 'train.lrr'" in err
    assert "did you mean 'train.lr'?" in err
    err = usage_error(capsys, ["--config", str(good), "--config.dat.order=3"], "stats")
    assert "did you mean 'data.order'?" in err
    err = usage_error(capsys, ["--config", str(good), "--config.zzz=1"])
    assert "the config's sections are checkpoint, data" in err


def test_override_with_a_bad_value_type(good, capsys):
    err = usage_error(capsys, ["--config", str(good), "--config.train.lr=fast"])
    assert "--config.train.lr=fast" in err and "could not convert" in err
    err = usage_error(capsys, ["--config", str(good), "--config.train.global_batch=1.5"])
    assert "--config.train.global_batch=1.5" in err


def test_override_with_an_invalid_value(good, capsys):
    err = usage_error(capsys, ["--config", str(good), "--config.data.thresholds=(0.5,9)"], "stats")
    assert "data.thresholds=(0.5, 9" in err and "increase strictly" in err
    err = usage_error(capsys, ["--config", str(good), "--config.train.warmup_ratio=2"])
    assert "train.warmup_ratio=2.0 is invalid" in err


def test_missing_config_flag_and_unknown_flag(good, capsys):
    assert "--config is required" in usage_error(capsys, [])
    assert "Unknown command line flag 'bogus'" in usage_error(
        capsys, ["--config", str(good), "--bogus"])


def test_bad_data_still_exits_1(good, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{not json\n")  # a bad record: the data's fault
    assert cli_main(["stats", "--config", str(good)]) == 1
    assert "data.jsonl:1" in capsys.readouterr().err


def test_missing_data_file_is_a_usage_error(good, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data.jsonl does not exist: found before any data is read
    err = usage_error(capsys, ["--config", str(good)], "stats")
    assert f"no such file or directory: data.jsonl (data.paths, relative to {tmp_path})" in err


def test_required_field_missing_is_named():
    c = valid()
    del c.train["lr"]
    with pytest.raises(ConfigError, match=r"the config has no field train\.lr"):
        validate_config(c)
    c = valid()
    del c.train["z_loss"]  # optional fields are checked only where present
    validate_config(c)


@pytest.mark.parametrize(("override", "says"), [
    ("--config.data.replay=-0.5", r"data\.replay=-0\.5 is invalid: it must be a number >= 0"),
    ("--config.data.replay=nan", r"data\.replay=nan is invalid: it must be a number >= 0"),
    ("--config.data.replay=lots", r"--config\.data\.replay=lots.*could not convert"),
    ("--config.train.schedule_scope=epoch",
     r"train\.schedule_scope='epoch' is invalid: choose one of 'phase', 'run'"),
    ("--config.train.carry_optimizer=True",
     r"no field 'train\.carry_optimizer'; it was replaced: use train\.schedule_scope='run'"),
])
def test_replay_and_schedule_scope_mistakes_are_one_line(good, capsys, override, says):
    err = usage_error(capsys, ["--config", str(good), override])
    assert re.search(says, err), err


@pytest.mark.parametrize("order", ["oneoff", "3", "1+2+3"])
def test_replay_with_a_single_phase_is_refused(good, capsys, order):
    """Replay needs an earlier phase; refused rather than silently ignored."""
    err = usage_error(capsys, ["--config", str(good), f"--config.data.order={order}",
                               "--config.data.replay=0.5"])
    assert (f"data.replay=0.5 has no effect with data.order='{order}' (one phase: nothing "
            "earlier to replay)") in err
    assert cli_main(["stats", "--config", str(good), f"--config.data.order={order}",
                     "--config.data.replay=0.5"]) == 2


def _set(c: ConfigDict, fields: dict) -> ConfigDict:
    """`c` with each dotted field set (e.g. {"model.lora.rank": 16})."""
    for path, value in fields.items():
        *parents, name = path.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[name] = value
    return c


LORA = {"model.lora.rank": 16, "model.init_from": "base"}  # a LoRA run on a pretrained base
LORA_INVALID = [  # (fields set on a valid config, what the message must say)
    ({"model.lora.rank": -1},
     r"^model\.lora\.rank=-1 is invalid: it must be an integer >= 0 .*0 = LoRA off"),
    ({**LORA, "model.lora.alpha": 0.0}, r"^model\.lora\.alpha=0\.0 is invalid: it must be a number > 0"),
    ({**LORA, "model.lora.alpha": -8.0}, r"^model\.lora\.alpha=-8\.0 is invalid"),
    ({**LORA, "model.lora.dropout": 1.0}, r"^model\.lora\.dropout=1\.0 is invalid: .*in \[0, 1\)"),
    ({**LORA, "model.lora.dropout": -0.1}, r"^model\.lora\.dropout=-0\.1 is invalid"),
    ({**LORA, "model.lora.base_qtype": "int4"},
     r"^model\.lora\.base_qtype='int4' is invalid: choose one of '', 'int8', 'nf4'"),
    ({**LORA, "model.lora.targets": "attn\\.q"},
     r"^model\.lora\.targets 'attn\\\\.q' matches no module; the modules are self_attn\.q_proj, "
     r"self_attn\.k_proj, .*mlp\.down_proj \(or their short names q, k, v, o, gate, up, down\)"),
    ({**LORA, "model.lora.targets": "q,vv"}, r"'vv' is not one of q, k, v, o, gate, up, down"),
    ({**LORA, "model.lora.targets": "query"}, r"'query' matches no module"),
    ({**LORA, "model.lora.targets": "self_attn.(q"}, r"'self_attn\.\(q' is not a regex"),
    ({**LORA, "model.lora.targets": ""}, r"empty; choose from q, k, v"),
    ({"model.lora.rank": 16}, r"^model\.lora\.rank=16 needs model\.init_from, which is empty: LoRA "
     r"trains adapters on a frozen pretrained base: set model\.init_from to an HF directory or "
     r"checkpoint \(--config\.model\.init_from=DIR\)"),
    ({"export.lora": "peft"}, r"^export\.lora='peft' is invalid: choose one of 'merged', 'adapter', 'both'"),
] + [  # a LoRA field set while LoRA is off (rank 0): refused, not silently ignored
    ({f"model.lora.{name}": value},
     rf"^model\.lora\.{name}={re.escape(repr(value))} has no effect: LoRA is off \(model\.lora\.rank=0, "
     r"full fine-tuning\); set --config\.model\.lora\.rank=16 to train adapters, or reset "
     rf"model\.lora\.{name} to ")
    for name, value in (("base_qtype", "nf4"), ("base_qtype", "int8"), ("init_from", "adapter"),
                        ("merge_each_phase", True), ("alpha", 32.0), ("targets", "q,v"),
                        ("dropout", 0.05))]


LORA_INVALID += [  # settings that cannot go together, or with this model
    ({**LORA, "model.intermediate_size": 180, "model.lora.base_qtype": "nf4"},
     r"^model\.lora\.base_qtype='nf4' quantises blocks of 16-64 values along "
     r"model\.intermediate_size, whose size 180 is not a multiple of 16; use "
     r"--config\.model\.lora\.base_qtype=''"),
    ({**LORA, "model.intermediate_size": 128, "model.lora.base_qtype": "int8",
      "model.lora.merge_each_phase": True},
     r"^model\.lora\.merge_each_phase=True with model\.lora\.base_qtype='int8': merging into a "
     r"quantised base would re-quantise it"),
    ({**LORA, "model.lora.merge_each_phase": True, "train.schedule_scope": "run"},
     r"^model\.lora\.merge_each_phase=True with train\.schedule_scope='run': the optimizer state "
     r"would carry over to adapters it never saw"),
    ({**LORA, "model.lora.merge_each_phase": True, "checkpoint.phase_params": False},
     r"^model\.lora\.merge_each_phase=True needs checkpoint\.phase_params=True"),
]


@pytest.mark.parametrize("fields", [
    {**LORA, "model.intermediate_size": 128, "model.lora.base_qtype": "nf4",
     "model.lora.dropout": 0.05},
    {**LORA, "model.lora.merge_each_phase": True, "model.lora.dropout": 0.1},
])
def test_lora_settings_that_go_together_pass(fields):
    validate_config(_set(valid(), fields))


EXPORT_WITH_MERGES = [
    ({**LORA, "model.lora.merge_each_phase": True, "export.lora": "adapter"},
     r"^export\.lora='adapter' is impossible with model\.lora\.merge_each_phase=True: after a merge, "
     r"the later phases' adapters sit on a base that is no longer the original.*cannot be applied "
     r"to the original base; use --config\.export\.lora=merged"),
    ({**LORA, "model.lora.merge_each_phase": True, "export.lora": "both"},
     r"^export\.lora='both' is impossible"),
]


@pytest.mark.parametrize(("fields", "says"), EXPORT_WITH_MERGES)
def test_export_lora_adapter_with_merges_is_explained(fields, says):
    with pytest.raises(ConfigError) as e:
        validate_config(_set(valid(), fields), ("export",))
    assert re.search(says, str(e.value)), str(e.value)


@pytest.mark.parametrize(("fields", "says"), LORA_INVALID,
                         ids=[",".join(f"{k}={v!r}" for k, v in f.items()) for f, _ in LORA_INVALID])
def test_lora_mistakes_are_named(fields, says):
    with pytest.raises(ConfigError) as e:
        validate_config(_set(valid(), fields))
    msg = str(e.value)
    assert re.search(says, msg), msg
    assert "--config." in msg and "\n" not in msg  # what to do, on one line


def test_lora_rank_must_be_an_integer():
    c = valid()
    c.model.lora = ConfigDict({**lora_section().to_dict(), "rank": 8.5})  # a hand-built section
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank=8\.5 is invalid: it must be an "
                                          r"integer >= 0"):
        validate_config(c)


@pytest.mark.parametrize("fields", [
    LORA,
    {**LORA, "model.lora.targets": "q, v", "model.lora.alpha": 32.0},
    {**LORA, "model.lora.targets": "self_attn\\..*", "model.lora.init_from": "adapter"},
    {**LORA, "export.lora": "both"},
    {"model.lora.targets": "q , k,v,o,gate,up,down"},  # rank 0: the same targets, spelt otherwise
    {"model.lora.targets": "self_attn\\..*|mlp\\..*"},
])
def test_valid_lora_configs_pass(fields):
    validate_config(_set(valid(), fields))


def test_lora_spec_from_section():
    c = valid()
    assert spec_from_section(c.model.lora) is None and spec_from_section(None) is None  # off
    _set(c, {**LORA, "model.lora.targets": "self_attn\\..*", "model.lora.dropout": 0.1})
    assert spec_from_section(c.model.lora) == LoraSpec(16, 16.0, ("q", "k", "v", "o"), 0.1)
    c.model.lora.targets = "down, q"
    assert spec_from_section(c.model.lora).targets == ("q", "down")  # in TARGETS order
    c.model.lora.targets = "mlp\\.(gate|up)_proj"
    assert spec_from_section(c.model.lora).targets == ("gate", "up")


def test_model_config_ignores_the_lora_section():
    c = valid()
    plain = c.model.to_dict()
    del plain["lora"]
    assert model_config(c.model) == model_config(ConfigDict(plain))


def test_configs_without_a_lora_section_still_validate():
    """Config files built before LoRA (a model section by hand, no `model.lora`)."""
    c = valid()
    del c.model["lora"]
    del c.export["lora"]
    validate_config(c)
    c = _set(valid(), {"export.lora": "adapter"})
    del c.model["lora"]
    validate_config(c)  # no merge_each_phase to conflict with


def test_export_check_reads_model_lora_only_where_present():
    """Subcommands validate some sections only; the export's LoRA check spans two."""
    c = _set(valid(), {**LORA, "model.lora.merge_each_phase": True, "export.lora": "adapter"})
    validate_config(c, sections=("train", "checkpoint"))
    with pytest.raises(ConfigError, match=r"^export\.lora='adapter' is impossible"):
        validate_config(c, sections=("export",))
    del c["model"]
    validate_config(c, sections=("export",))


@pytest.mark.parametrize(("overrides", "says"), [
    (["--config.model.lora.rank=-1"], r"model\.lora\.rank=-1 is invalid: it must be an integer >= 0"),
    (["--config.model.lora.rank=8.5"], r"--config\.model\.lora\.rank=8\.5"),
    (["--config.model.lora.base_qtype=nf4"],
     r"model\.lora\.base_qtype='nf4' has no effect: LoRA is off \(model\.lora\.rank=0"),
    (["--config.model.lora.rank=8"], r"model\.lora\.rank=8 needs model\.init_from"),
    (["--config.model.init_from=base", "--config.model.lora.rank=8",
      "--config.model.lora.targets=q,vv"], r"'vv' is not one of q, k"),
    (["--config.model.lora.rnk=8"], r"no field 'model\.lora\.rnk'; did you mean 'model\.lora\.rank'\?"),
])
def test_lora_mistakes_on_the_command_line_are_one_line(good, capsys, overrides, says):
    err = usage_error(capsys, ["--config", str(good), *overrides])
    assert re.search(says, err), err


def test_lora_overrides_on_the_command_line(good):
    fv = parse_config_argv(["--config", str(good), "--config.model.init_from=base",
                            "--config.model.lora.rank=8", "--config.model.lora.targets=q,v"],
                           "phased-jax train", "usage")
    assert spec_from_section(fv.config.model.lora) == LoraSpec(8, 16.0, ("q", "v"))
