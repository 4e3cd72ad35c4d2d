"""LoRA on the LM in stage 2 (issue 23, item 3), in process on the demo preset with the trainer's own
DeepSpeed engine (ZeRO-2, one rank, gloo): what it trains, what the export holds, and what inference
rebuilds from the export (the adapters merged into the LM by peft's ``merge_and_unload``).

The expected LoRA parameter count is peft's own (``PeftModel.get_nb_trainable_parameters`` of
``get_peft_model`` on the demo OPT, peft 0.18+), not a formula of ours."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
R, ALPHA = 4, 8
BASE = ["data.num_workers=0", "data.shuffle_buffer=1", "train.stage2.micro_batch_size=8", "train.stage2.lr=3e-3",
        "train.stage2.warmup_steps=0"]


def peft_count(cfg) -> int:
    """peft's count of the LoRA parameters ``LoraConfig(r, lora_alpha)`` adds to the demo OPT (its
    default targets for OPT: q_proj, v_proj)."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTForCausalLM

    from msmedcap.paths import resolve_asset

    lm = OPTForCausalLM.from_pretrained(resolve_asset(cfg.model.lm.name_or_path))
    trainable, _ = get_peft_model(lm, LoraConfig(r=R, lora_alpha=ALPHA)).get_nb_trainable_parameters()
    return trainable


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank(monkeypatch):
    import deepspeed
    import torch.distributed as dist

    from msmedcap.train.world import single_process_env

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    single_process_env()
    deepspeed.init_distributed("gloo")
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage_2_trains_the_lora_and_the_merged_export_captions_as_the_trained_model(precision, one_rank, tmp_path):
    from peft.tuners.lora import LoraLayer

    from msmedcap.config import load_config
    from msmedcap.data.loader import make_train_loader
    from msmedcap.models import build_model, load_from_export, save_trainable
    from msmedcap.models.lora import lora_parameter_names
    from msmedcap.train.ds_config import fill_ds_config, read_ds_json
    from msmedcap.train.engine import build_engine, master_weights_into
    from msmedcap.train.world import to_device

    dtypes = [f"train.precision={precision}", f"model.lm.dtype={precision}", f"model.frozen_dtype={precision}"]
    plain_cfg = load_config("demo", BASE + dtypes)
    cfg = load_config("demo", BASE + dtypes + [f"model.lm.lora.r={R}", f"model.lm.lora.alpha={ALPHA}"])
    torch.manual_seed(0)
    plain = build_model(plain_cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg.model)

    # the model's trainables: today's plus peft's own count of LoRA parameters, all in the LM
    added = peft_count(cfg)
    assert added == 2 * 2 * R * (64 + 64)  # 2 layers x (q_proj, v_proj) x (A: r x 64 + B: 64 x r)
    counts, before = model.parameter_counts(), plain.parameter_counts()
    assert counts["total"]["trainable"] == before["total"]["trainable"] + added
    assert counts["lm"]["trainable"] == added and counts["lm"]["frozen"] == before["lm"]["frozen"]
    lora = lora_parameter_names(model)
    assert len(lora) == 8 and all(".lora_A.default." in n or ".lora_B.default." in n for n in lora)
    assert {n for n, _ in model.trainable_named_parameters()} - set(lora) == \
        {n for n, _ in plain.trainable_named_parameters()}
    # stage 2 trains them beside what it trains today; stage 1 (no LM) does not
    assert [n for n, _ in model.stage_named_parameters(2) if n not in lora] == \
        [n for n, _ in plain.stage_named_parameters(2)]
    assert set(lora) <= {n for n, _ in model.stage_named_parameters(2)}
    assert not set(lora) & {n for n, _ in model.stage_named_parameters(1)}

    ds = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), cfg, 2, 1)
    assert ds["zero_optimization"]["stage"] == 2
    batch = to_device(next(iter(make_train_loader(cfg, 2, 0, 1))), torch.device("cpu"))
    params = dict(model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in params.items() if n.startswith("captioner.lm.") and n not in lora}
    start = {n: params[n].detach().clone() for n in lora}
    engine, _ = build_engine(model, cfg, 2, ds)
    # the optimizer's parameters are exactly the stage's: today's stage-2 trainables and the LoRA
    held = {id(p) for group in engine.optimizer.bit16_groups for p in group}
    assert held == {id(p) for _, p in model.stage_named_parameters(2)}
    assert all(params[n].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32) for n in lora)
    losses = []
    for _ in range(4):
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["lm"]))
    assert losses[-1] < losses[0]
    assert master_weights_into(model, 2) == len(model.stage_named_parameters(2))  # the LoRA's fp32 masters too
    save_trainable(model, tmp_path / "export", cfg)
    engine.destroy()
    # the LM's own weights are bit-identical; every LoRA tensor moved (B from zero)
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n].float(), start[n]) for n in lora)

    from safetensors.torch import load_file

    exported = load_file(tmp_path / "export/trainable.safetensors")
    assert set(lora) <= exported.keys() and {exported[n].dtype for n in lora} == {torch.float32}

    merged, _ = load_from_export(tmp_path / "export")  # what evaluate / caption build
    unmerged, _ = load_from_export(tmp_path / "export", merge=False)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())  # the LM's own modules again
    assert type(merged.captioner.lm.model.decoder.layers[0].self_attn.q_proj) is nn.Linear
    assert lora_parameter_names(merged) == [] and lora_parameter_names(unmerged) == lora
    for m in (model, merged, unmerged):
        m.eval()
    with torch.no_grad():
        trained, again = model.caption_logits(batch), unmerged.caption_logits(batch)
        folded = merged.caption_logits(batch)
        unmerged.captioner.lora_tuner.disable_adapter_layers()  # peft's switch: the LM without its LoRA
        without = unmerged.caption_logits(batch)
    assert torch.equal(trained, again)  # the export holds exactly what was trained
    # merged: equal within rounding (fp32: 1e-4 as the BLIP-2 parity tests; bf16: 4 ulps at the logits' scale)
    tol = 1e-4 if precision == "fp32" else 4 * 2.0 ** -8 * float(trained.abs().max())
    assert (folded.float() - trained.float()).abs().max() <= tol
    if precision == "fp32":  # the LoRA changed the LM's outputs far beyond the merge's rounding
        assert (without - trained).abs().max() > 1000 * tol
    captions = model.generate(batch, num_beams=3, max_len=30)
    same = [a == b for a, b in zip(merged.generate(batch, num_beams=3, max_len=30), captions)]
    # bf16: the merge's rounding may flip a near-tie between two beams (one word, e.g. a margin the model
    # is unsure of); the logits above are the exact check
    assert all(same) if precision == "fp32" else sum(same) >= len(same) - 1, (same, captions)
    assert len(set(captions)) > 1


def test_a_stage_1_export_starts_stage_2_with_fresh_adapters(tmp_path):
    """Stage 1 builds no LM, so its export has no LoRA tensors: stage 2 loads it (as Trainer.build
    does) with the adapters at peft's initialisation (B = 0: the LM computes what it did without
    them); any other missing tensor is still refused."""
    from msmedcap.config import load_config
    from msmedcap.models import build_model, save_trainable
    from msmedcap.models.lora import lora_parameter_names

    cfg = load_config("demo", [f"model.lm.lora.r={R}", "model.frozen_dtype=fp32", "model.lm.dtype=fp32"])
    stage1 = build_model(cfg.model, with_lm=False)
    assert lora_parameter_names(stage1) == []
    save_trainable(stage1, tmp_path / "stage1", cfg)
    model = build_model(cfg.model, init_trainables=False)
    with pytest.raises(ValueError, match="8 trainable tensors missing"):
        model.load_trainable(tmp_path / "stage1", strict=True)
    model.load_trainable(tmp_path / "stage1", strict=True, fresh=lora_parameter_names(model))
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in stage1.trainable_named_parameters())
    assert all(not loaded[n].any() for n in lora_parameter_names(model) if ".lora_B." in n)
    with pytest.raises(ValueError, match="1 trainable tensors missing"):
        model.load_trainable(tmp_path / "stage1", strict=True, fresh=lora_parameter_names(model)[:-1])


def test_the_transformers_blip2_export_of_a_lora_model_holds_the_merged_lm(tokenizers, tmp_path):
    """`msmedcap export --hf` of a blip2 export with LoRA: a plain transformers BLIP-2 (no adapter
    tensors: its OPT is the LM with the LoRA merged in), captioning as `msmedcap caption` does (the
    export's own check compared their logits before writing). Set-up as tests/integration/
    test_export_hf_blip2.py (tiny timm EVA tower, random frozen parts); the LoRA's B is drawn away from
    its zero init, as a trained one is."""
    import numpy as np
    from helpers.model_kit import demo_config, tiny_eva_clip_json
    from PIL import Image
    from safetensors.torch import load_file
    from test_export_hf_blip2 import hf_captions

    from msmedcap.cli import main
    from msmedcap.eval.caption import caption_files
    from msmedcap.models import build_model, save_trainable
    from msmedcap.models.lora import lora_parameter_names

    cfg = demo_config(tokenizers, "model.variant=blip2", "model.frozen_dtype=fp32", "model.lm.dtype=fp32",
                      f"model.clip.name={tiny_eva_clip_json(tmp_path)}", "model.clip.pretrained=null",
                      "model.clip.image_size=28", "model.lm.num_soft_prompts=0", "eval.num_beams=1", "eval.min_len=2",
                      "eval.max_len=12", f"model.lm.lora.r={R}", "model.lm.lora.target_modules=[q_proj, v_proj, fc1]")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    lora = lora_parameter_names(model)
    with torch.no_grad():
        for n in lora:
            if ".lora_B." in n:
                model.get_parameter(n).normal_(std=0.5)
    save_trainable(model, tmp_path / "export", cfg)
    assert main(["export", str(tmp_path / "export"), "--hf", str(tmp_path / "hf")]) == 0
    hf = load_file(tmp_path / "hf/model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in hf)
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    frozen = model.captioner.lm.get_submodule("model.decoder.layers.0.self_attn.q_proj").base_layer.weight
    assert not torch.allclose(hf[f"language_model.{q}"], frozen, atol=1e-3)  # the LoRA is in the LM's weights

    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(28, 28), (40, 33), (100, 29)]):
        images.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    ours = [c for _, c in caption_files([str(p) for p in images], str(tmp_path / "export"))]
    assert hf_captions(tmp_path / "hf", images, cfg.model.lm.prompt) == ours and any(ours)


@pytest.mark.parametrize("family, targets", [("opt", None), ("gpt2", None), ("llama", "[q_proj, k_proj, v_proj, o_proj]"),
                                             ("biogpt", "[q_proj, v_proj]"), ("t5", None)])
def test_lora_on_each_lm_family_counts_as_peft_and_merges_to_the_same_logits(family, targets, tmp_path):
    """Tiny random LMs of each family (tests/helpers/lm_kit.py) as model.lm with LoRA: peft's own default
    targets where it has them (OPT, Llama: q_proj, v_proj; GPT-2: its Conv1D c_attn; T5: q, v), named ones
    where not (BioGPT). The trainables grow by peft's count; with the adapters moved off their init (B drawn
    as a trained one's), the export rebuilt merged gives the unmerged model's logits (fp32, 1e-4) and its
    greedy captions."""
    from helpers.lm_kit import DEMO_LM_TOKENIZER, save_tiny_lm
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from msmedcap.config import load_config
    from msmedcap.data.loader import make_train_loader
    from msmedcap.models import build_model, load_from_export, save_trainable
    from msmedcap.models.lora import lora_parameter_names
    from msmedcap.tokenization import load_lm_tokenizer
    from msmedcap.train.world import to_device

    lm_dir = save_tiny_lm(family, tmp_path / family, load_lm_tokenizer(DEMO_LM_TOKENIZER), std=0.2)
    base = [f"model.lm.name_or_path={lm_dir}", "model.frozen_dtype=fp32", "model.lm.dtype=fp32",
            "data.num_workers=0", "data.shuffle_buffer=1", "train.stage2.micro_batch_size=4"]
    lora = [f"model.lm.lora.r={R}", f"model.lm.lora.alpha={ALPHA}"] + (
        [f"model.lm.lora.target_modules={targets}"] if targets else [])
    plain = build_model(load_config("demo", base).model)
    cfg = load_config("demo", base + lora)
    torch.manual_seed(0)
    model = build_model(cfg.model)

    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    peft_lm = get_peft_model(auto.from_pretrained(lm_dir), LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=None if targets is None else targets.strip("[]").split(", ")))
    added, _ = peft_lm.get_nb_trainable_parameters()
    assert added > 0 and model.parameter_counts()["total"]["trainable"] == \
        plain.parameter_counts()["total"]["trainable"] + added
    with torch.no_grad():
        for n in lora_parameter_names(model):
            if ".lora_B." in n:
                model.get_parameter(n).normal_(std=0.2)
    save_trainable(model, tmp_path / "export", cfg)
    merged, _ = load_from_export(tmp_path / "export")
    assert lora_parameter_names(merged) == []
    batch = to_device(next(iter(make_train_loader(cfg, 2, 0, 1))), torch.device("cpu"))
    model.eval(), merged.eval()
    with torch.no_grad():
        trained, folded = model.caption_logits(batch), merged.caption_logits(batch)
        model.captioner.lora_tuner.disable_adapter_layers()
        without = model.caption_logits(batch)
        model.captioner.lora_tuner.enable_adapter_layers()
    assert (folded - trained).abs().max() <= 1e-4
    assert (without - trained).abs().max() > 100 * 1e-4  # the adapters matter, far beyond the merge's rounding
    assert merged.generate(batch, num_beams=1, max_len=12) == model.generate(batch, num_beams=1, max_len=12)
