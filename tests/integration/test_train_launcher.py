"""The trainer under the real `deepspeed` launcher on CPU (gloo): 2 ranks on the demo, exact resume
after SIGKILL, two simulated nodes, and a stop signal. Launcher starts are slow here (~10 s of
imports each), so each run is a few steps of a tiny config and several checks share one run."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import TINY_RUN, free_port, losses, records

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = TINY_RUN
NO_EVAL = ["train.eval_at_end=false"]


# both domains alike in each tiny batch (the preset's 1 : 3 mix): four stage-1 steps of four samples then
# show learning rather than which domain a batch drew
BALANCED = ['data.train=["shards/demo/general-train-{000..003}.tar::1", "shards/demo/medical-train-{000..003}.tar::1"]']


def deepspeed_cmd(out: Path, *args, launcher=("--num_gpus", "2")) -> list:
    return ["deepspeed", *launcher, "--master_port", str(free_port()), "launch/pretrain.py",
            "--deepspeed", "ds_configs/zero2.json", f"train.output_dir={out}", *TINY, *BALANCED, *args]


def run(cmd: list, log: Path, timeout: int = 900) -> str:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    text = log.read_text()
    assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Both stages straight through on 2 ranks, evaluated at the end."""
    out = tmp_path_factory.mktemp("straight")
    cmd = deepspeed_cmd(out)
    log = run(cmd, out.parent / "straight.log")
    # DeepSpeed's CPU all-reduce segments (66 MB each, in RAM) do not outlive the run (train/world.py)
    port = cmd[cmd.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    return out, log


def test_two_ranks_train_checkpoint_log_and_evaluate(straight):
    out, log = straight
    recs = records(out)
    assert [(r["stage"], r["step"]) for r in recs] == [(1, s) for s in range(1, 5)] + [(2, s) for s in range(1, 9)]
    from msmedcap.train.metrics import RECORD_FIELDS

    for r in recs:
        assert set(RECORD_FIELDS) <= set(r), r
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["overflow_skipped_steps"] == 0 and isinstance(r["skipped_samples"], dict)
    assert {"loss_itc", "loss_itm", "loss_itg", "loss_clip/itc", "loss_sam/itg"} <= set(recs[0])
    assert {"loss_lm"} <= set(recs[-1])
    stage1 = [r["loss"] for r in recs if r["stage"] == 1]
    assert sum(stage1[-2:]) / 2 < sum(stage1[:2]) / 2 - 0.2, stage1  # learning, not noise
    assert recs[-1]["lr"] == pytest.approx(1e-4)  # cosine reached min_lr at the last step

    # Checkpoints: the last keep_last=2 of each stage, atomic names only, trainable weights only.
    ckpts = out / "stage2/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.endswith(".py")) == \
        ["latest", "step00000006", "step00000008"]
    assert (ckpts / "latest").read_text() == "step00000008"
    exported = load_file(out / "stage2/export/trainable.safetensors")
    state = torch.load(ckpts / "step00000008/mp_rank_00_model_states.pt", weights_only=False)
    names = {k.removeprefix("model.") for k in state["module"]}
    # exactly what stage 2 trains (the trainables it does not train are frozen for it, so DeepSpeed leaves
    # them out; the checkpoint's export holds every trainable): no encoder, no OPT weights
    from msmedcap.models.msmedcap_model import MSMedCap

    assert names == {n for n in exported if MSMedCap.stage_trains(n, 2)} and names < set(exported)
    assert set(load_file(ckpts / "step00000008/export/trainable.safetensors")) == set(exported)
    assert not any(k.startswith(("encoders.", "captioner.lm.")) for k in names)
    # each rank's ZeRO-2 partition (DeepSpeed prefixes "bf16_" when the run is bf16)
    assert sorted(p.name.removeprefix("bf16_") for p in (ckpts / "step00000008").glob("*optim_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert state["step"] == 8 and state["stage"] == 2 and state["world_size"] == 2
    assert {"trainable.safetensors", "config.yaml"} <= {p.name for p in (ckpts / "step00000008/export").iterdir()}
    assert (out / "stage1/export/trainable.safetensors").is_file()

    # Replicas agree, outputs are where the summary says.
    # 16 hex digits each: two ranks printing at once can land on one line
    digests = re.findall(r"rank (\d): trainable weights sha256 ([0-9a-f]{16})", log)
    assert len(digests) == 4 and len({d for _, d in digests[2:]}) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [s["steps_done"] for s in summary["stages"]] == [4, 8]
    ev = summary["evaluation"]
    assert json.loads((out / "eval/scores.json").read_text())["samples"]["total"] == 8
    assert ev["CIDEr"] >= 0 and ev["baseline_CIDEr"] >= 0 and ev["baseline_caption"]
    assert (out / "loss.png").stat().st_size > 1000 and list((out / "tensorboard").glob("events.*"))
    assert "held-out CIDEr" in log


def test_resume_after_sigkill_is_exact(straight, tmp_path):
    """Stage 2 killed hard after its step-3 checkpoint, resumed with --resume auto: the losses of
    the remaining steps equal the uninterrupted run's, bit for bit."""
    ref, _ = straight
    out = tmp_path / "run"
    out.mkdir()
    subprocess.run(["cp", "-r", str(ref / "stage1"), str(out / "stage1")], check=True)  # stage 1 is done
    cmd = deepspeed_cmd(out, *NO_EVAL, "--resume", "auto")
    with open(tmp_path / "killed.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while not (out / "stage2/checkpoints/step00000003").is_dir():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # launcher and ranks, no chance to clean up
        proc.wait()
    assert not (out / "stage2/export").exists()  # it really was interrupted
    killed_at = max(r["step"] for r in records(out) if r["stage"] == 2)
    log = run(cmd, tmp_path / "resumed.log")
    assert "stage 1: already finished" in log and "stage 2: resumed from" in log
    got, want = losses(out), losses(ref)
    resumed_from = int(re.search(r"stage 2: resumed from .*step(\d+) at step", log).group(1))
    assert 3 <= resumed_from < 8 and killed_at >= resumed_from
    assert [k for k in got if k[0] == 2] == [(2, s) for s in range(1, 9)]
    for s in range(resumed_from + 1, 9):
        assert got[(2, s)] == want[(2, s)], f"step {s}: {got[(2, s)]} != {want[(2, s)]}"
    assert load_file(out / "stage2/export/trainable.safetensors").keys() == \
        load_file(ref / "stage2/export/trainable.safetensors").keys()
    a, b = (load_file(d / "stage2/export/trainable.safetensors") for d in (out, ref))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the run's summary still has the stage finished before the kill (steps, losses, digest)
    stages = {r["stage"]: r for r in json.loads((out / "summary.json").read_text())["stages"]}
    first = json.loads((ref / "stage1/result.json").read_text())
    assert sorted(stages) == [1, 2] and stages[1]["finished_earlier"] and not stages[2]["finished_earlier"]
    assert {k: stages[1][k] for k in ("steps_done", "last_loss", "weights_sha256")} == \
        {k: first[k] for k in ("steps_done", "last_loss", "weights_sha256")}


def test_two_nodes_no_ssh_end_with_identical_weights(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    port, out = free_port(), tmp_path / "run"
    procs, logs = [], []
    for node in (0, 1):
        launcher = ("--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                    "--master_addr", "127.0.0.1")
        cmd = deepspeed_cmd(out, "train.stage=1", "train.stage1.steps=3", *NO_EVAL, launcher=launcher)
        cmd[cmd.index("--master_port") + 1] = str(port)
        logs.append(tmp_path / f"node{node}.log")
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
    rcs = [p.wait(timeout=900) for p in procs]
    texts = [log.read_text() for log in logs]
    assert rcs == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    digests = [re.findall(r"rank (\d): trainable weights sha256 ([0-9a-f]{16})", t) for t in texts]
    assert [d[0][0] for d in digests] == ["0", "1"]  # one rank on each node
    assert digests[0][0][1] == digests[1][0][1]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_sigterm_checkpoints_at_step_boundary_and_exits_0(tmp_path):
    """SIGTERM to the whole process group (what the launcher and schedulers do): the data loader
    worker survives it, the rank checkpoints at the next step boundary and exits 0."""
    out = tmp_path / "run"
    cmd = [sys.executable, "launch/pretrain.py", f"train.output_dir={out}", *TINY, "train.stage=1",
           "train.stage1.steps=500", "train.ckpt_every=1000"]
    with open(tmp_path / "log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").is_file() and len(records(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    log = (tmp_path / "log").read_text()
    assert rc == 0, log[-3000:]
    assert "received SIGTERM" in log
    stage = json.loads((out / "summary.json").read_text())["stages"][0]
    assert stage["stopped_by"] == "SIGTERM" and 2 <= stage["steps_done"] < 500
    ckpt = out / f"stage1/checkpoints/step{stage['steps_done']:08d}"
    assert (ckpt / "mp_rank_00_model_states.pt").is_file() and not (out / "stage1/export").exists()
