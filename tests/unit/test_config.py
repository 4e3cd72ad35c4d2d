"""msmedcap.config: presets, overrides, and errors that name the key or file before any work starts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from msmedcap.cli import main
from msmedcap.config import Config, ConfigError, config_from_dict, load_config, parse_override
from msmedcap.data.shard_spec import split_weighted_spec

REPO = Path(__file__).resolve().parents[2]


def test_presets_load_and_overrides_apply(monkeypatch):
    monkeypatch.chdir(REPO)  # the demo preset's shard paths are relative to the checkout
    demo = load_config("demo")  # files checked: the committed demo shards and tokenizers exist
    assert demo.model.clip.image_size == 32 and demo.model.sam.image_size == 128
    assert demo.model.branches == ("clip", "sam")
    paper = load_config("paper", ["model.sam.checkpoint=sam_vit_b_01ec64.pth"], check_files=False)
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


# --------------------------------------------------------------------------- every field, table-driven
# dotted key -> (one valid override value, [invalid values]); values are YAML as on the command line,
# applied to the demo preset. A field added to the config without an entry here fails
# test_every_field_has_a_table_entry: its constraints must be decided and tested.
FIELD_CASES = {
    "model.variant": ("blip2", ["vit", "1"]),
    "model.clip.name": ("pkg://assets/open_clip/tiny-vit.json", ["''", "[a]"]),
    # null: a frozen part without weights (refused unless model.allow_random_weights)
    "model.clip.pretrained": ("pkg://assets/open_clip/tiny-vit-demo.safetensors", ["''", "{a: 1}", "null"]),
    "model.clip.image_size": ("64", ["0", "30", "big"]),  # 30: not a multiple of the stand-in's patch 8
    "model.clip.feature_layer": ("-1", ["3", "-4", "x"]),  # the stand-in has 3 blocks
    "model.clip.ln_vision": ("false", ["maybe"]),
    "model.clip.token_mlp": ("4", ["-1", "1.5", "true"]),
    "model.clip.stage1_checkpoint": ("null", ["''", "{a: 1}"]),
    "model.clip.stage1_skip": ("[encoder_side]", ["5", "{a: 1}"]),
    "model.sam.type": ("tiny", ["vit_x", "vit_b"]),  # vit_b: the demo's tiny encoder overrides are refused
    "model.sam.checkpoint": ("pkg://assets/sam/tiny-demo.pth", ["''", "[a]", "null"]),
    "model.sam.image_size": ("256", ["0", "100", "-8"]),  # 100: not a multiple of patch 8
    "model.sam.token_layout": ("spatial", ["rows"]),
    "model.sam.preprocess": ("medsam", ["medsam2", "clip", 1]),
    "model.sam.encoder": ("{embed_dim: 64, depth: 2, num_heads: 2, patch_size: 16, out_chans: 32, "
                          "global_attn_indexes: [1], window_size: 8}",
                          ["[1]", "{depth: 0}", "{patchsize: 8}", "{patch_size: 3}", "{global_attn_indexes: [5]}",
                           "{embed_dim: 63}", "{depth: two}", "{use_abs_pos: 1}", "{global_attn_indexes: 1}"]),
    "model.sam.encoder_chunk": ("2", ["-1", "x", "1.5"]),
    "model.sam.ln_vision": ("false", ["maybe"]),
    "model.sam.token_mlp": ("2", ["-2", "x"]),
    "model.sam.stage1_checkpoint": ("null", ["''", "[a]"]),
    "model.sam.stage1_skip": ("[]", ["5"]),
    "model.qformer.hidden_size": ("128", ["0", "66", "x"]),  # 66: not divisible by the 4 heads
    "model.qformer.num_layers": ("1", ["0", "1.5"]),
    "model.qformer.num_heads": ("8", ["0", "3"]),
    "model.qformer.intermediate_size": ("256", ["0", "-1"]),
    "model.qformer.cross_attention_freq": ("2", ["0"]),
    "model.qformer.num_query_tokens": ("8", ["0", "100"]),  # 100: 4 + 2 x 100 + 32 > 128 LM positions
    "model.qformer.embed_dim": ("16", ["0"]),
    "model.qformer.max_text_len": ("16", ["1", "0"]),
    "model.qformer.cross_attention_init": ("null", ["0", "-0.1", "x", ".inf"]),
    "model.qformer.tokenizer": ("pkg://assets/tokenizers/qformer", ["''", "{a: 1}"]),
    "model.qformer.init_from": ("null", ["''", "[a]"]),
    "model.lm.name_or_path": ("pkg://assets/opt-demo", ["''", "[a]", "null"]),
    "model.lm.tokenizer": ("pkg://assets/tokenizers/lm", ["''", "[a]"]),
    "model.lm.config": ("{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, ffn_dim: 128, "
                        "max_position_embeddings: 128, word_embed_proj_dim: 64}",
                        ["[1]", "{hidden_sise: 64}", "{hidden_size: 0}", "{hidden_size: 65}", "{ffn_dim: [1]}",
                         "{num_hidden_layers: 2.5}", "{max_position_embeddings: 40}", "{1: 2}",
                         "{model_type: no_such_lm}", "{model_type: vit}", "{model_type: t5, ffn_dim: 8}"]),
    "model.lm.chat_template": ("true", ["maybe"]),
    "model.lm.caption_end": ("'</s>'", ["''", "[a]"]),
    "model.lm.prompt": ("''", ["{a: 1}", "[a]"]),
    "model.lm.num_soft_prompts": ("0", ["-1", "100", "x"]),  # 100: no room for the caption in 128 positions
    "model.lm.max_caption_len": ("16", ["0", "100"]),
    "model.routing": ("{general: [clip], medical: [clip, sam]}",
                      ["[clip]", "{general: [vit]}", "{surgical: [sam]}", "{general: clip2}", "{general: [[clip]]}",
                       "{general: [clip, clip]}", "{medical: [{a: 1}]}"]),
    "model.frozen_dtype": ("bf16", ["fp8"]),
    "model.lm.dtype": ("fp32", ["fp8", "half"]),
    "model.stage1.counterfactuals.enabled": ("true", ["1", "x"]),
    "model.stage1.counterfactuals.sets": ("{margin: [smooth, irregular]}", ["x", "[a, b]", "{margin: [smooth]}",
                                          "{count: ['one * lesion', 'two lesions']}"]),
    "model.stage1.counterfactuals.use": ("[margin]", ["[shape]", "[1]"]),
    "model.stage1.counterfactuals.itm_share": ("1.0", ["-0.1", "1.5", "x"]),
    "model.stage1.counterfactuals.itc": ("true", ["1", "x"]),
    "model.stage1.negatives_skip_same_text": ("true", ["1", "x"]),
    "model.stage1.loss_weights": ("{itm: 2}", ["{itx: 1}", "{itm: -1}", "x", "{itm: .nan}"]),
    "model.lm.lora.r": ("4", ["0", "-1", "2.5"]),  # the optional section: setting any of its keys turns LoRA on
    "model.lm.lora.alpha": ("8", ["0", "-1", ".nan"]),
    "model.lm.lora.dropout": ("0.1", ["1", "-0.1"]),
    "model.lm.lora.target_modules": ("[q_proj, v_proj]", ["[q_proj, q_proj]", "[q_proj, '']", "[all-linear, q_proj]"]),
    "model.blip2_checkpoint": ("null", ["''", "[a]"]),
    "model.feature_cache": ("/tmp/cache", ["''", "[a]"]),
    "model.allow_random_weights": ("true", ["maybe", "1"]),
    "data.train": ("[a.tar::2, b.tar]", ["{a: 1}", "3"]),
    "data.eval": ("[a.tar]", ["{a: 1}", "3"]),
    "data.val": ("[a.tar]", ["{a: 1}", "3"]),
    "data.num_workers": ("0", ["-1", "x"]),
    "data.shuffle_buffer": ("1", ["0"]),
    "data.shuffle_initial": ("10", ["0"]),
    "data.max_image_pixels": ("1000000", ["0"]),
    "data.segment_batches": ("10", ["0"]),
    "data.jpeg_draft": ("2", ["0.5", "-1", ".inf", "x"]),
    "data.gpu_decode": ("false", ["maybe"]),
    "data.resize_on_device": ("true", ["maybe"]),
    "train.stage": ("2", ["3", "both"]),
    "train.output_dir": ("runs/x", ["''", "[a]"]),
    "train.seed": ("0", ["-1", "4294967296", "x"]),
    "train.precision": ("fp32", ["fp8"]),
    "train.dist_timeout_s": ("60", ["0", "x"]),
    "train.activation_checkpointing": ("true", ["maybe", "2"]),
    "train.memory_limit_gib": ("40.5", ["0", "-1", "x"]),
    "train.log_every": ("1", ["0"]),
    "train.ckpt_every": ("1", ["0"]),
    "train.keep_last": ("1", ["0"]),
    "train.eval_at_end": ("false", ["maybe"]),
    # validation keys alone: each needs train.eval_every (tests/unit/test_validation_config.py has the rest)
    "train.eval_every": ("0", ["-1", "x", "2"]),  # 2: no data.val
    "train.eval_generate_every": ("0", ["-1", "4"]),
    "train.keep_best_by": ("null", ["[a]", "val/loss:min"]),
    "train.early_stop_patience": ("0", ["-1", "3"]),
    "eval.val_max_samples": ("5", ["-1"]),
    "eval.batch_size": ("1", ["0"]),
    "eval.num_beams": ("1", ["0", "x"]),
    "eval.min_len": ("0", ["-1", "31"]),  # 31 > eval.max_len 30
    "eval.max_len": ("3", ["0", "2"]),  # 2 < the demo's eval.min_len 3
    "eval.repetition_penalty": ("1.2", ["0", "-1", ".inf", ".nan"]),
    "eval.length_penalty": ("-0.5", [".inf", ".nan", "x"]),
    "eval.max_samples": ("0", ["-1"]),
    "eval.gallery": ("false", ["maybe"]),
    "eval.protocol": ("imageclef", ["clef2030", "null", "[coco]"]),
    **{f"eval.imageclef.{k}": ("null", ["''", "[a]"]) for k in (
        "bertscore_model", "clip_model", "clip_pretrained", "images", "concepts", "concepts_predicted")},
    "eval.imageclef.bertscore_layers": ("40", ["0", "x", "1.5"]),
    **{f"train.{st}.{k}": v for st in ("stage1", "stage2") for k, v in {
        "steps": ("500", ["0", "x"]),
        "micro_batch_size": ("1", ["0"]),
        "grad_accum": ("2", ["0"]),
        "lr": ("3e-4", ["0", "-1", ".inf", "1e-9"]),  # 1e-9 < the demo's min_lr
        "min_lr": ("0", ["-1", "1"]),  # 1 > lr
        "warmup_lr": ("0", ["-1", ".nan"]),
        "warmup_steps": ("0", ["-1"]),
        "weight_decay": ("0", ["-0.1", ".inf"]),
        "betas": ("[0.9, 0.98]", ["[0.9]", "[0.9, 1]", "[0.9, x]", "[true, 0.9]", "0.9", "[0.9, 0.99, 0.9]"]),
        "grad_clip": ("0", ["-1"]),
    }.items()},
}


def test_every_field_has_a_table_entry():
    from msmedcap.config import config_fields

    fields = set(config_fields())
    assert fields - set(FIELD_CASES) == set(), "config fields without constraint cases in FIELD_CASES"
    assert set(FIELD_CASES) - fields == set(), "FIELD_CASES entries for fields that no longer exist"


@pytest.mark.parametrize("key", sorted(FIELD_CASES))
def test_each_field_accepts_its_valid_value(key):
    valid, _ = FIELD_CASES[key]
    cfg = load_config("demo", [f"{key}={valid}"], check_files=False)
    assert cfg is not None


@pytest.mark.parametrize("key, bad", [(k, b) for k in sorted(FIELD_CASES) for b in FIELD_CASES[k][1]])
def test_each_invalid_value_is_refused_naming_the_key(key, bad):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [f"{key}={bad}"], check_files=False)
    msg = str(err.value)
    assert key in msg, msg
    assert re.search(r"must be|expected|is not one of|unknown|not an argument of \w+Config", msg), msg


def test_warmup_longer_than_the_stage_is_reported():
    from msmedcap.config import ConfigWarning

    with pytest.warns(ConfigWarning, match=r"train.stage2.warmup_steps \(20\) > train.stage2.steps \(5\)"):
        load_config("demo", ["train.stage2.steps=5"], check_files=False)


def test_tiny_sam_patch_default_matches_the_encoder():
    from msmedcap.models.sam_settings import TINY_SAM_PATCH
    from msmedcap.models.encoders import TINY_SAM_DEFAULTS

    assert TINY_SAM_DEFAULTS["patch_size"] == TINY_SAM_PATCH


def test_paper_preset_patch_sizes():
    """EVA01-g-14 is a timm tower: its patch (14) comes from the timm model name."""
    with pytest.raises(ConfigError, match=r"model.clip.image_size must be a multiple of EVA01-g-14's patch size 14"):
        load_config("paper", ["model.clip.image_size=225"], check_files=False)
    with pytest.raises(ConfigError, match=r"model.sam.image_size must be 1024 for model.sam.type=vit_b"):
        load_config("paper", ["model.sam.image_size=512"], check_files=False)


def test_a_retired_key_is_dropped_from_old_configs_and_refused_with_another_value(monkeypatch):
    import msmedcap.config as config

    monkeypatch.setitem(config.RETIRED_KEYS, "train.old_knob", (0, "it was never implemented"))
    old = load_config("demo").to_dict()
    old["train"]["old_knob"] = 0
    assert "old_knob" not in config_from_dict(old).to_dict()["train"]
    old["train"]["old_knob"] = 100
    with pytest.raises(ConfigError, match="train.old_knob was removed: it was never implemented"):
        config_from_dict(old)


def test_old_configs_with_eval_every_0_still_load():
    """train.eval_every was retired as 0 (issue 12) and is back (issue 25): old exports' 0 means off."""
    old = load_config("demo").to_dict()
    old["train"]["eval_every"] = 0
    assert config_from_dict(old).train.eval_every == 0
