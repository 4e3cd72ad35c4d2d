"""Validation during training (issue 25, item 3), on real runs of the demo preset with tiny step counts
(CPU, gloo): the val records land at the right steps (metrics.jsonl, TensorBoard, the log line);
training with validation is bit-identical to training without; ``stageN/best/`` holds the weights of the
logged best step (the fp32 masters DeepSpeed's own ``zero_to_fp32`` rebuilds from that step's
checkpoint); a run killed after its best step and resumed keeps the record and ends with the same best
step and export; two ranks validate their uneven shares exactly once and stop early together; the best
export is replaced atomically."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import TINY_RUN, free_port, records, run_env, with_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = with_overrides(TINY_RUN, "train.stage2.steps=6", "train.ckpt_every=2", "train.keep_last=10",
                      "train.eval_at_end=false", "eval.batch_size=4", "train.stage2.lr=3e-4")
# val/loss:max puts each stage's best step before its last (the loss falls; at TINY_RUN's stage-2 lr of 3e-3
# it rises in fp32): the resume test needs a best step that only the checkpoint's record remembers.
VAL = ["data.val=[shards/demo/general-eval-000.tar]", "eval.val_max_samples=12", "train.eval_every=2",
       "train.eval_generate_every=4", "train.keep_best_by=val/loss:max"]


def pretrain(out: Path, *args) -> list:
    return [sys.executable, "launch/pretrain.py", f"train.output_dir={out}", *TINY, *args]


def launch(cmd: list, log: Path, fault: str | None = None) -> tuple:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=run_env(fault),
                            timeout=600).returncode
    return rc, log.read_text()


def val_records(out: Path) -> list:
    return [r for r in records(out) if "val/loss" in r]


def tensors(path: Path) -> dict:
    return load_file(path / "trainable.safetensors")


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def summary_best(out: Path) -> dict:
    return {s["stage"]: s["best"] for s in json.loads((out / "summary.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Both stages with validation, one rank, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    rc, log = launch(pretrain(out, *VAL), out.parent / "reference.log")
    assert rc == 0, log[-3000:]
    return out, log


def test_val_metrics_logged_at_the_right_steps(reference):
    out, log = reference
    vals = val_records(out)
    assert [(r["stage"], r["step"]) for r in vals] == [(1, 2), (1, 4), (2, 2), (2, 4), (2, 6)]
    for r in vals:
        assert r["val/samples"] == 12 and r["val/skipped"] == {}
    for r in vals[:2]:  # stage 1: ITC/ITM/ITG per branch (general samples train both), summed as training logs them
        assert {f"val/loss_{b}/{h}" for b in ("clip", "sam") for h in ("itc", "itm", "itg")} <= set(r)
        assert r["val/loss_itc"] == pytest.approx(r["val/loss_clip/itc"] + r["val/loss_sam/itc"])
        assert r["val/loss"] == pytest.approx(r["val/loss_itc"] + r["val/loss_itm"] + r["val/loss_itg"])
        assert "val/cider" not in r
    assert "val/cider" not in vals[2] and vals[2]["val/loss"] == vals[2]["val/loss_lm"] > 0
    for r in vals[3:]:  # generation steps: greedy captions scored
        assert 0 <= r["val/cider"] and 0 < r["val/distinct"] <= 1
        assert {"val/findings/background", "val/findings/objects"} <= set(r)  # the demo-general parser's fields
        assert r["val/findings"] == pytest.approx((r["val/findings/background"] + r["val/findings/objects"]) / 2)
    # the training records are all there, one per step
    assert [(r["stage"], r["step"]) for r in records(out) if "lr" in r] == \
        [(1, s) for s in range(1, 5)] + [(2, s) for s in range(1, 7)]
    assert "stage 2 step 4/6 | val loss" in log and "cider" in log

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("stage2/val/cider")] == [4, 6]
    assert [e.step for e in tb.Scalars("stage1/val/loss_itc")] == [2, 4]


def with_stage1_of(ref: Path, out: Path) -> Path:
    """``out`` holding the reference's finished stage 1 (export, record, metrics): ``--resume auto`` then
    trains stage 2 alone, from the same start."""
    shutil.copytree(ref / "stage1", out / "stage1")
    shutil.copy(ref / "metrics.jsonl", out / "metrics.jsonl")
    return out


def test_validation_leaves_training_bit_identical(reference, tmp_path):
    """Its own RNG: stage 2's losses and final weights without validation are the same."""
    out, _ = reference
    plain = with_stage1_of(out, tmp_path / "plain")
    rc, log = launch(pretrain(plain, "--resume", "auto"), tmp_path / "plain.log")
    assert rc == 0, log[-3000:]
    assert not val_records(plain)[2:]  # stage 1's came with the copy; stage 2 ran without
    train_losses = [[(r["stage"], r["step"], r["loss"]) for r in records(o) if "lr" in r and r["stage"] == 2]
                    for o in (out, plain)]
    assert len(train_losses[0]) == 6 and train_losses[0] == train_losses[1]
    assert_same_tensors(tensors(out / "stage2/export"), tensors(plain / "stage2/export"))


def best_step(vals: list, stage: int) -> int:
    rs = [r for r in vals if r["stage"] == stage]
    return max(rs, key=lambda r: (r["val/loss"], -r["step"]))["step"]  # max; the first of equals


def test_best_export_is_the_logged_best_step(reference):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out, _ = reference
    vals, best = val_records(out), summary_best(out)
    for stage in (1, 2):
        step = best_step(vals, stage)
        assert best[stage]["step"] == step and best[stage]["metric"] == "val/loss" and best[stage]["mode"] == "max"
        assert best[stage]["export"] == str(out / f"stage{stage}/best")
        assert [r["val/best_step"] for r in vals if r["stage"] == stage][-1] == step
        assert json.loads((out / f"stage{stage}/best/best.json").read_text())["step"] == step
        ckpt = out / f"stage{stage}/checkpoints/step{step:08d}"
        # the trained parameters: the optimizer's fp32 masters at that step, as DeepSpeed rebuilds them from
        # the checkpoint; the rest (not trained in this stage): the checkpoint's export
        masters = {k[len("model."):]: v for k, v in
                   get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name).items()}
        want = {**tensors(ckpt / "export"), **masters}
        got = tensors(out / f"stage{stage}/best")
        assert masters and set(masters) < set(got)
        assert_same_tensors(got, want)
        assert (out / f"stage{stage}/best/config.yaml").read_bytes() == (ckpt / "export/config.yaml").read_bytes()
    assert f"stage 2: best val/loss {best[2]['value']:.4f} at step {best[2]['step']}" in reference[1]


def test_kill_after_the_best_step_then_resume_keeps_the_record(reference, tmp_path):
    ref, _ = reference
    ref_best = summary_best(ref)
    assert ref_best[2]["step"] <= 4, "the fixture's best step must come before the checkpoint resumed from"
    out = with_stage1_of(ref, tmp_path / "run")
    rc, log = launch(pretrain(out, *VAL, "--resume", "auto"), tmp_path / "kill.log", "kill@step.end@2.5")
    assert rc == -signal.SIGKILL, log[-3000:]
    state = json.loads((out / "stage2/checkpoints/step00000004/trainer_state.json").read_text())
    assert state["validation"]["step"] == ref_best[2]["step"]  # the record is in the checkpoint
    rc, log = launch(pretrain(out, *VAL, "--resume", "auto"), tmp_path / "resume.log")
    assert rc == 0, log[-3000:]
    assert "stage 2: resumed from" in log and "at step 4" in log
    def timeless(recs):
        return [{k: v for k, v in r.items() if k != "val/seconds"} for r in recs]

    assert timeless(val_records(out)) == timeless(val_records(ref))  # exactly: the same numbers at the same steps
    assert {s: {k: v for k, v in b.items() if k != "export"} for s, b in summary_best(out).items()} == \
        {s: {k: v for k, v in b.items() if k != "export"} for s, b in ref_best.items()}
    for stage in (1, 2):
        assert_same_tensors(tensors(out / f"stage{stage}/best"), tensors(ref / f"stage{stage}/best"))


def test_two_ranks_validate_uneven_shares_exactly_once_and_stop_early_together(tmp_path):
    """37 samples over 2 ranks (19 + 18) in batches of 6: 4 batches on rank 0, 3 on rank 1, so the
    stage-1 losses must run without collectives; every sample once. Early stopping (patience 1) is
    decided on rank 0 and taken by both ranks at the same step."""
    out = tmp_path / "run"
    args = ["train.stage1.steps=2", "train.stage2.steps=6", "eval.batch_size=6", "eval.val_max_samples=37",
            "data.val=[shards/demo/general-eval-000.tar,shards/demo/medical-eval-000.tar]", "train.eval_every=2",
            "train.eval_generate_every=2", "train.keep_best_by=val/loss:min", "train.early_stop_patience=1"]
    port, procs = str(free_port()), []
    for rank in (0, 1):
        e = run_env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port)
        log = open(tmp_path / f"r{rank}.log", "w")
        procs.append(subprocess.Popen(pretrain(out, *args), cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT))
    rcs = [p.wait(timeout=600) for p in procs]
    assert rcs == [0, 0], (tmp_path / "r0.log").read_text()[-3000:] + (tmp_path / "r1.log").read_text()[-3000:]
    vals = val_records(out)
    assert all(r["val/samples"] == 37 for r in vals)
    assert [(r["stage"], r["step"]) for r in vals if r["stage"] == 1] == [(1, 2)]
    stage2 = [r for r in vals if r["stage"] == 2]
    assert all("val/cider" in r for r in stage2)
    # patience 1: the stage ends at the first validation without a lower val/loss (at this lr it rises at
    # step 4 in fp32: one comes)
    best, stop = None, None
    for r in stage2:
        if best is not None and not r["val/loss"] < best:
            stop = r["step"]
            break
        best = r["val/loss"]
    result = {s["stage"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}[2]
    assert stop is not None and stop < 6, [r["val/loss"] for r in stage2]
    assert result["early_stopped_at"] == stop == result["steps_done"] == stage2[-1]["step"]
    assert [r["step"] for r in records(out) if "lr" in r and r["stage"] == 2] == list(range(1, stop + 1))
    assert (out / "stage2/export").is_dir()
    digests = [next(line for line in (tmp_path / f"r{r}.log").read_text().splitlines()[::-1] if "sha256" in line)
               for r in (0, 1)]
    assert digests[0].split()[-1] == digests[1].split()[-1]  # same weights on both ranks after the early stop


def test_best_export_is_replaced_atomically(tmp_path, monkeypatch):
    """A failure while the new best is written (a full disk here) leaves the previous best/ whole."""
    from msmedcap.config import load_config
    from msmedcap.models import build_model
    from msmedcap.train.validation import Validator

    cfg = load_config("demo", ["train.stage=2", *VAL])
    model = build_model(cfg.model)
    world = types.SimpleNamespace(rank=0, size=1, barrier=lambda: None)
    v = Validator(cfg, 2, world, model, None, tmp_path / "stage2/best")
    model.set_stage(2)
    v.update(2, 1.0)
    v.write_best(2)
    first = tensors(tmp_path / "stage2/best")
    with torch.no_grad():
        next(p for _, p in model.stage_named_parameters(2)).add_(1.0)
    v.update(4, 2.0)
    monkeypatch.setenv("MSMEDCAP_FAULT", "enospc@validation.before_best_rename@2.4")
    with pytest.raises(OSError):
        v.write_best(4)
    assert_same_tensors(tensors(tmp_path / "stage2/best"), first)
    assert json.loads((tmp_path / "stage2/best/best.json").read_text())["step"] == 2
    monkeypatch.delenv("MSMEDCAP_FAULT")
    v.write_best(4)
    assert json.loads((tmp_path / "stage2/best/best.json").read_text())["step"] == 4
    assert not torch.equal(tensors(tmp_path / "stage2/best")[next(n for n, _ in model.stage_named_parameters(2))],
                           first[next(n for n, _ in model.stage_named_parameters(2))])
