"""msmedcap plan and the training preflight (issue 21): memory per rank from the model's real parameter
counts and activations measured by a real forward/backward at micro batch 2 and 4, checked against a
measured micro batch 8; a micro batch that cannot fit stops `msmedcap train` before its engine exists."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msmedcap.bench.plan import GPUS, LiveBytes, linear_fit, usable_bytes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_live_bytes_counts_what_is_alive_at_once():
    with LiveBytes() as live:
        a = torch.empty(1 << 20)  # 4 MiB
        del a
        b = torch.empty(1 << 19)  # 2 MiB, after a was freed
        c = b.view(-1)  # a view of b's storage: no new bytes
    assert live.peak == 4 << 20 and live.live == 2 << 20 and c.numel() == 1 << 19


def test_linear_fit_and_known_gpus():
    assert linear_fit({1: 10.0, 2: 16.0, 4: 29.0}) == (6.0, 4.0)
    assert GPUS["h200"].memory_gib > GPUS["h100"].memory_gib > GPUS["a100-40"].memory_gib
    assert 0 < usable_bytes(80) < 80 * 2 ** 30


@pytest.fixture(scope="module")
def demo_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "msmedcap.cli", "plan", "--config", "demo", "--gpu", "h100,a100-40",
                           "--gpus", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_plan_reports_each_stage_per_gpu_with_a_checked_extrapolation(demo_plan):
    plan, stdout = demo_plan
    rows = plan["plans"]
    assert [(r["stage"], r["gpu"]) for r in rows] == [(1, "H100 SXM 80GB"), (1, "A100 40GB"),
                                                      (2, "H100 SXM 80GB"), (2, "A100 40GB")]
    for r in rows:
        assert r["activation_per_sample"] > 0 and r["flops_per_sample"] > 0 and r["encoder_per_image"] > 0
        assert r["static"]["counts"]["trained"] > 0 and r["fits"]
        assert r["check"]["micro_batch"] == 8 and abs(r["check"]["error"]) < 0.25  # measured at 8 vs extrapolated
    s1, s2 = rows[0], rows[2]
    assert s1["static"]["counts"]["lm"] == 0 < s2["static"]["counts"]["lm"]  # stage 1 holds no LM
    assert rows[1]["largest_micro_batch"] < rows[0]["largest_micro_batch"]  # 40 GB holds less than 80 GB
    assert "extrapolated from the two smaller" in stdout
    host = plan["host"]  # a data worker's memory and the node's /dev/shm need (msmedcap.data.memory)
    assert [h["stage"] for h in host] == [1, 2] and all(h["total_bytes"] > h["buffer_bytes"] > 0 for h in host)
    assert "a data worker holds up to" in stdout


def test_preflight_refuses_a_micro_batch_that_cannot_fit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "msmedcap.cli", "train", f"train.output_dir={tmp_path / 'run'}",
                           "train.memory_limit_gib=2.08", "train.stage1.micro_batch_size=64", "train.stage1.grad_accum=2",
                           "data.num_workers=0"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "train.stage1.micro_batch_size=64 needs" in err and "the largest that fits is" in err
    largest = int(err.split("the largest that fits is ")[1].split(":")[0])
    assert 1 <= largest < 64 and f"train.stage1.grad_accum={-(-128 // largest)}" in err
    assert not (tmp_path / "run/stage1/checkpoints").exists()
