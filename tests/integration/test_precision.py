"""One precision story (issue 20): what a bf16 engine trains is what a standalone evaluation of its
export rebuilds. The frozen encoders and LM never pass through the engine's cast, the LM runs in the
engine's dtype (recorded in the export's config.yaml), and the export holds the optimizer's fp32
masters, so the end-of-training evaluation and ``msmedcap evaluate --checkpoint EXPORT`` agree caption
for caption (before: 47 of 48 with bf16-rounded frozen weights)."""
import json
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = ["train.stage1.steps=3", "train.stage2.steps=4", "train.stage1.micro_batch_size=4",
        "train.stage2.micro_batch_size=4", "train.stage1.warmup_steps=0", "train.stage2.warmup_steps=0",
        "train.stage2.lr=3e-3", "train.log_every=1", "train.ckpt_every=100", "data.shuffle_buffer=16",
        "data.num_workers=0", "eval.max_samples=16", "eval.num_beams=2", "eval.gallery=false"]


def _run(args: list, log: Path) -> str:
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "msmedcap.cli", *args], cwd=REPO, stdout=f,
                            stderr=subprocess.STDOUT, timeout=900).returncode
    text = log.read_text()
    assert rc == 0, text[-4000:]
    return text


def _predictions(path: Path) -> dict:
    return {r["key"]: r["prediction"] for r in map(json.loads, path.read_text().splitlines())}


def test_bf16_engine_end_of_training_evaluation_equals_a_standalone_one(tmp_path):
    out = tmp_path / "run"
    log = _run(["train", f"train.output_dir={out}", "train.precision=bf16", *TINY], tmp_path / "train.log")
    assert "frozen LM bf16" in log
    export = out / "stage2/export"
    assert yaml.safe_load((export / "config.yaml").read_text())["model"]["lm"]["dtype"] == "bf16"
    # the export holds the fp32 masters of what stage 2 trained, not the engine's bf16 copies
    weights = load_file(export / "trainable.safetensors")
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    assert any((t.float() != t.bfloat16().float()).any() for t in weights.values())
    _run(["evaluate", "--checkpoint", str(export), "--out", str(tmp_path / "again"), "eval.max_samples=16",
          "eval.num_beams=2", "eval.gallery=false"], tmp_path / "eval.log")
    trained, again = _predictions(out / "eval/predictions.jsonl"), _predictions(tmp_path / "again/predictions.jsonl")
    assert len(trained) == 16 and trained == again


def test_a_bf16_stage_and_its_export_give_the_same_logits_bit_for_bit(monkeypatch, tmp_path):
    """In process: a bf16 ZeRO-2 stage-2 step, the fp32 masters into the model (as the trainer's
    finish does), the export, and the model rebuilt from it compute the same caption logits, bit for
    bit: no frozen weight was rounded by the engine (DeepSpeed casts every parameter it wraps), and no
    trainable differs between the trained model and its export."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from msmedcap.config import load_config
    from msmedcap.data.loader import make_train_loader
    from msmedcap.models import build_model, load_from_export, save_trainable
    from msmedcap.train.ds_config import fill_ds_config, read_ds_json
    from msmedcap.train.engine import build_engine, master_weights_into
    from msmedcap.train.world import single_process_env, to_device

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    single_process_env()
    cfg = load_config("demo", ["model.frozen_dtype=fp32", "model.lm.dtype=bf16", "train.precision=bf16",
                               "data.num_workers=0", "data.shuffle_buffer=1", "train.stage2.micro_batch_size=4",
                               "train.stage2.lr=1e-2", "train.stage2.warmup_steps=0"])
    ds = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), cfg, 2, 1)
    batch = to_device(next(iter(make_train_loader(cfg, 2, 0, 1))), torch.device("cpu"))
    deepspeed.init_distributed("gloo")
    try:
        model = build_model(cfg.model)
        engine, _ = build_engine(model, cfg, 2, ds)
        engine.backward(engine(batch)["loss"])
        engine.step()
        assert master_weights_into(model, 2) == len(model.stage_named_parameters(2))
        save_trainable(model, tmp_path / "export", cfg)
        engine.destroy()
    finally:
        dist.destroy_process_group()
    rebuilt, _ = load_from_export(tmp_path / "export")
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model.caption_logits(batch), rebuilt.caption_logits(batch))


def test_an_fp16_lm_under_a_bf16_engine_is_a_config_error(tmp_path):
    """The stage-2 gradient crosses the frozen LM; in fp16 with no loss scale (a bf16 engine has none)
    its small values flush to zero, so that combination stops before any work, naming both keys."""
    proc = subprocess.run([sys.executable, "-m", "msmedcap.cli", "train", f"train.output_dir={tmp_path / 'run'}",
                           "model.lm.dtype=fp16", "train.precision=bf16"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.lm.dtype=fp16" in proc.stderr and "train.precision=fp16" in proc.stderr
    assert not (tmp_path / "run").exists()
