"""msmedcap.config: presets, overrides, and errors that name the key or file before any work starts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from msmedcap.cli import main
from msmedcap.config import Config, ConfigError, load_config, parse_override, split_weighted_spec

REPO = Path(__file__).resolve().parents[1]


def test_presets_load_and_overrides_apply(monkeypatch):
    monkeypatch.chdir(REPO)  # the demo preset's shard paths are relative to the checkout
    demo = load_config("demo")  # files checked: the committed demo shards and tokenizers exist
    assert demo.model.clip.image_size == 32 and demo.model.sam.image_size == 128
    assert demo.model.branches == ("clip", "sam")
    paper = load_config("paper", check_files=False)
    assert (paper.model.clip.name, paper.model.sam.type, paper.model.lm.name_or_path) == (
        "EVA01-g-14", "vit_b", "facebook/opt-2.7b")
    assert paper.model.qformer.num_query_tokens == 32
    cfg = load_config("demo", ["train.stage=1", "model.variant=blip2", "train.stage1.lr=3e-4",
                               "data.train=[a.tar::2, b.tar]", "eval.gallery=false"], check_files=False)
    assert cfg.train.stage == "1" and cfg.model.branches == ("clip",) and cfg.train.stage1.lr == 3e-4
    assert cfg.data.train == ["a.tar::2", "b.tar"] and cfg.eval.gallery is False
    assert isinstance(Config().to_yaml(), str)
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize("override, message", [
    ("model.qformer.num_layerz=2", "model.qformer.num_layerz"),                  # unknown key, named in full
    ("nosuch.key=1", "nosuch"),
    ("train.stage1.steps=many", "train.stage1.steps: expected an integer"),      # wrong types
    ("train.stage1.lr=fast", "train.stage1.lr: expected a number"),
    ("eval.gallery=maybe", "eval.gallery: expected true/false"),
    ("model.variant=vit", "model.variant: 'vit' is not one of"),
    ("model.sam=3", "model.sam: expected a mapping"),
    ("train.stage2.micro_batch_size=0", "train.stage2.micro_batch_size must be >= 1"),
    ("data.segment_batches=0", "data.segment_batches must be >= 1"),
    ("model.routing.medical=[clip, vit]", "model.routing.medical"),
    ("noequals", "not of the form section.key=value"),
])
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("demo", [override], check_files=False)


def test_missing_files_fail_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"data.train: shard file not found: shards/demo/general-train-004.tar"):
        load_config("demo", ['data.train=["shards/demo/general-train-{000..004}.tar::1"]'])
    with pytest.raises(ConfigError, match="data.eval: shard file not found: nope.tar"):
        load_config("demo", ["data.eval=[nope.tar]"])
    with pytest.raises(ConfigError, match="model.sam.checkpoint: file not found: /no/sam.pth"):
        load_config("demo", ["model.sam.checkpoint=/no/sam.pth"])
    with pytest.raises(ConfigError, match="model.qformer.tokenizer: not found"):
        load_config("demo", ["model.qformer.tokenizer=./no/such/dir"])
    with pytest.raises(ConfigError, match="unknown preset 'nosuch'"):
        load_config("nosuch")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherit: demo\ndata: {shuffle_buffer: [1}\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    bad.write_text("inherit: demo\ndata: {shuffle_bufer: 10}\n")  # a user preset building on demo
    with pytest.raises(ConfigError, match="data.shuffle_bufer"):
        load_config(str(bad), check_files=False)


def test_weighted_specs():
    assert split_weighted_spec("s/x-{0..3}.tar::2.5") == ("s/x-{0..3}.tar", 2.5)
    assert split_weighted_spec("s/x.tar") == ("s/x.tar", 1.0)
    with pytest.raises(ConfigError, match="weight 'heavy' is not a number"):
        split_weighted_spec("x.tar::heavy")
    with pytest.raises(ConfigError, match="weight must be > 0"):
        split_weighted_spec("x.tar::0")


def test_cli_reports_config_errors_before_work(capsys):
    assert main(["shards", "inspect", "x.tar::bad"]) == 2
    assert "config error" in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    ("eval.num_beams=0", "eval.num_beams"), ("eval.batch_size=0", "eval.batch_size"),
    ("model.lm.max_caption_len=0", "model.lm.max_caption_len"),
    ("model.qformer.num_query_tokens=0", "model.qformer.num_query_tokens"),
    ("model.lm.num_soft_prompts=-1", "model.lm.num_soft_prompts"), ("train.stage1.lr=-1", "train.stage1.lr"),
    ("eval.repetition_penalty=0", "eval.repetition_penalty"), ("train.keep_last=0", "train.keep_last"),
    ("train.stage2.betas=[0.9]", "train.stage2.betas"),
])
def test_out_of_range_settings_fail_before_work_naming_the_key(override, key):
    """The settings users got wrong (issue 14): each is refused by load_config, naming its own key."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be "):
        load_config("demo", [override], check_files=False)
