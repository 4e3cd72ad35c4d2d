"""LoRA on the LM through the real commands (issue 23, item 3), on the demo preset with tiny step counts
and the demo's precision (fp32; bf16 LoRA engines: tests/integration/test_lora_engine.py):

- ``launch/pretrain.py`` trains stage 1 (no LM), then stage 2 with the LoRA starting fresh from stage 1's
  export; its end-of-training evaluation runs the unmerged model;
- ``msmedcap evaluate --checkpoint`` and ``msmedcap caption`` on the export (LoRA merged into the LM)
  give the same captions, and so does the self-contained directory of ``msmedcap export --bundle``;
- a SIGKILL mid-step (after a checkpoint) and ``--resume auto``: losses and final weights, LoRA
  included, equal the uninterrupted run's (as tests/integration/test_faults.py does for the model without LoRA).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import TINY_RUN, losses, with_overrides
from msmedcap.cli import main
from msmedcap.eval.caption import caption_files

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN = with_overrides(TINY_RUN, "model.lm.lora.r=4", "model.lm.lora.alpha=8", "train.stage1.steps=2",
                     "train.stage2.steps=6", "train.ckpt_every=2", "eval.num_beams=2")


def env(fault: str | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("MSMEDCAP_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    if fault:
        e["MSMEDCAP_FAULT"] = fault
    return e


def launch(cmd: list, log: Path, fault: str | None = None) -> tuple:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env(fault), timeout=900).returncode
    return rc, log.read_text()


def pretrain(out: Path, *args) -> list:
    return [sys.executable, "launch/pretrain.py", f"train.output_dir={out}", *RUN, *args]


def msmedcap(*args) -> list:
    return [sys.executable, "-m", "msmedcap.cli", *args]


def predictions(path: Path) -> dict:
    return {r["key"]: r["prediction"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Both stages uninterrupted, evaluated at the end (the unmerged model's captions)."""
    out = tmp_path_factory.mktemp("lora") / "reference"
    rc, log = launch(pretrain(out), out.parent / "reference.log")
    assert rc == 0, log[-3000:]
    # peft's count for r=4 on the demo OPT's q_proj and v_proj: 2 layers x 2 x 4 x (64 + 64)
    assert "stage 2: LoRA on the LM (model.lm.lora): 2048 trainable parameters in 8 tensors" in log
    assert "stage 1: LoRA" not in log
    return out


def test_the_export_carries_the_lora_and_captions_merged_as_the_trained_model(reference, tmp_path):
    stage1 = load_file(reference / "stage1/export/trainable.safetensors")
    stage2 = load_file(reference / "stage2/export/trainable.safetensors")
    lora = sorted(k for k in stage2 if ".lora_" in k)
    assert len(lora) == 8 and not any(".lora_" in k for k in stage1)  # stage 1 builds no LM
    assert set(stage2) - set(lora) == set(stage1)
    assert all(stage2[k].any() for k in lora)  # B trained away from its zero init
    trained = predictions(reference / "eval/predictions.jsonl")
    assert len(trained) == 8

    rc, log = launch(msmedcap("evaluate", "--checkpoint", str(reference / "stage2/export"), "--out",
                              str(tmp_path / "eval"), "eval.max_samples=8", "eval.num_beams=2", "eval.gallery=false"),
                     tmp_path / "evaluate.log")
    assert rc == 0, log[-3000:]
    assert predictions(tmp_path / "eval/predictions.jsonl") == trained

    images = []  # the first eval samples' images as files, for `msmedcap caption`
    with tarfile.open(REPO / "shards/demo/general-eval-000.tar") as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            if ext in ("png", "jpg") and key in trained and len(images) < 3:
                images.append(tmp_path / member.name)
                images[-1].write_bytes(tar.extractfile(member).read())
    assert len(images) == 3
    rc, log = launch(msmedcap("caption", "--json", "--checkpoint", str(reference / "stage2/export"),
                              *map(str, images)), tmp_path / "caption.log")
    assert rc == 0, log[-3000:]
    captioned = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [c["caption"] for c in captioned] == [trained[p.name.partition(".")[0]] for p in images]

    # msmedcap export --bundle: every tensor, the LM's with the LoRA merged in, and a config without LoRA
    assert main(["export", str(reference), "--bundle", str(tmp_path / "bundle")]) == 0
    stored = json.loads((tmp_path / "bundle/config.json").read_text())["config"]["model"]["lm"]
    assert stored["lora"] is None
    assert not any(".lora_" in k or ".base_layer." in k for k in load_file(tmp_path / "bundle/model.safetensors"))
    assert [c for _, c in caption_files(list(map(str, images)), str(tmp_path / "bundle"))] == \
        [c["caption"] for c in captioned]


def test_a_kill_mid_step_then_resume_auto_is_exact(reference, tmp_path):
    out = tmp_path / "run"
    rc, log = launch(pretrain(out, "train.eval_at_end=false"), tmp_path / "kill.log", "kill@step.after_backward@2.3")
    assert rc == -signal.SIGKILL, f"the kill did not strike (exit {rc}):\n{log[-3000:]}"
    rc, log = launch(pretrain(out, "train.eval_at_end=false", "--resume", "auto"), tmp_path / "resume.log")
    assert rc == 0, log[-3000:]
    assert "stage 2: resumed from" in log and "at step 2" in log
    got, want = losses(out), losses(reference)
    assert got == want
    a = load_file(out / "stage2/export/trainable.safetensors")
    b = load_file(reference / "stage2/export/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
