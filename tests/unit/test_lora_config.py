"""``model.lm.lora`` (issue 23, item 3): off by default; every mistake a config error naming the key,
before any weight is read. Target modules are checked against the LM's own module tree (built on the
meta device from the demo OPT's config.json, msmedcap/assets/opt-demo) with peft's matching
(``peft.tuners.tuners_utils.check_target_module_exists``) and peft's own injection."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from msmedcap.config import ConfigError, load_config
from msmedcap.models.lora import check_lora, peft_config

REPO = Path(__file__).resolve().parents[2]


def test_lora_is_off_by_default_and_an_override_turns_it_on_with_peft_defaults():
    assert load_config("demo", check_files=False).model.lm.lora is None
    cfg = load_config("demo", ["model.lm.lora.r=4"], check_files=False)
    lora = cfg.model.lm.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (4, 16.0, 0.0, [])
    assert cfg.to_dict()["model"]["lm"]["lora"] == {"r": 4, "alpha": 16.0, "dropout": 0.0, "target_modules": []}
    assert load_config("demo", ["model.lm.lora={}"], check_files=False).model.lm.lora.r == 8
    made = peft_config(lora)  # empty target_modules: peft picks its default for the LM's family
    assert (made.r, made.lora_alpha, made.lora_dropout, made.target_modules) == (4, 16.0, 0.0, None)
    assert peft_config(load_config("demo", ["model.lm.lora.target_modules=[all-linear]"],
                                   check_files=False).model.lm.lora).target_modules == "all-linear"
    check_lora(cfg.model)  # the demo OPT has peft's defaults (q_proj, v_proj)


@pytest.mark.parametrize("override, message", [
    ("model.lm.lora.rank=4", "unknown config key 'model.lm.lora.rank' (known keys there: alpha, dropout, r, target_modules)"),
    ("model.lm.lora.r=0", "model.lm.lora.r must be >= 1, got 0"),
    ("model.lm.lora.r=-2", "model.lm.lora.r must be >= 1, got -2"),
    ("model.lm.lora.r=2.5", "model.lm.lora.r: expected an integer"),
    ("model.lm.lora.alpha=0", "model.lm.lora.alpha must be > 0"),
    ("model.lm.lora.dropout=1", "model.lm.lora.dropout must be in [0, 1)"),
    ("model.lm.lora.target_modules=[q_proj, q_proj]", "model.lm.lora.target_modules must be distinct module names"),
    ("model.lm.lora.target_modules=[all-linear, q_proj]", "model.lm.lora.target_modules: all-linear must be the only entry"),
    ("model.lm.lora=8", "model.lm.lora: expected a mapping"),
    # anything but the LM: the frozen encoders (and the Q-Formers, trained whole) take no adapters
    ("model.clip.lora.r=4", "model.clip.lora: LoRA adapts the language model only (model.lm.lora)"),
    ("model.sam.lora={}", "model.sam.lora: LoRA adapts the language model only"),
    ("model.qformer.lora.r=4", "model.qformer.lora: LoRA adapts the language model only"),
])
def test_bad_lora_settings_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override], check_files=False)
    assert message in str(e.value)


@pytest.mark.parametrize("targets, message", [
    ("[q_proj, qproj]", "'qproj' matches no module of the LM (OPTForCausalLM; its linear layers: fc1, fc2, k_proj, "
                        "lm_head, out_proj, q_proj, v_proj)"),
    ("[self_attn.query]", "'self_attn.query' matches no module of the LM"),
    ("[layers]", "a ModuleList cannot be adapted"),  # matches, but peft adapts layers, not containers
])
def test_target_modules_the_lm_lacks_fail_before_any_weight_is_read(targets, message, monkeypatch):
    from transformers import OPTForCausalLM

    loaded = []
    monkeypatch.setattr(OPTForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))  # must not be reached
    cfg = load_config("demo", [f"model.lm.lora.target_modules={targets}"], check_files=False)
    with pytest.raises(ConfigError) as e:
        check_lora(cfg.model)
    assert str(e.value).startswith("model.lm.lora.target_modules") and message in str(e.value)
    from msmedcap.models import build_model

    with pytest.raises(ConfigError, match="model.lm.lora.target_modules"):
        build_model(cfg.model)
    assert loaded == []


def test_the_check_builds_no_weights_even_for_a_large_lm():
    """The check's LM lives on the meta device: Llama-3-8B (the widths of Meta's config.json) is checked
    without allocating its weights; its attention projections are q/k/v/o_proj, OPT's out_proj it lacks."""
    from msmedcap.models.lora import _skeleton

    llama3_8b = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                 "vocab_size": 128256}
    cfg = load_config("demo", ["model.lm.name_or_path=null", "model.allow_random_weights=true",
                               "model.lm.lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"], check_files=False)
    cfg.model.lm.config = llama3_8b
    lm = _skeleton(cfg.model)
    assert type(lm).__name__ == "LlamaForCausalLM" and {p.device.type for p in lm.parameters()} == {"meta"}
    assert sum(p.numel() for p in lm.parameters()) > 8e9
    check_lora(cfg.model)
    cfg.model.lm.lora.target_modules = ["q_proj", "out_proj"]
    with pytest.raises(ConfigError, match="'out_proj' matches no module of the LM \\(LlamaForCausalLM; its linear "
                                          "layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj\\)"):
        check_lora(cfg.model)


@pytest.mark.slow
def test_the_train_command_refuses_a_bad_target_before_stage_1(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "msmedcap.cli", "train", f"train.output_dir={out}",
                           "model.lm.lora.target_modules=[q_proj, qproj]"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: model.lm.lora.target_modules: 'qproj' matches no module of the LM" in proc.stderr
    assert not out.exists()
