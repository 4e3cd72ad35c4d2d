"""launch/slurm/*.sbatch on a real two-node SLURM cluster started on this machine (munged,
slurmctld, two slurmd; see slurm_cluster.py). One short demo run on 2 nodes, preempted the way a
time limit does it (SIGUSR1 to the batch shell): the ranks checkpoint, the job requeues itself and
resumes in the same run dir to the end (checkpoints, exports, metrics); then evaluate.sbatch on it.
One job covers both the plain run and preemption: every job start costs ~10 s of imports per rank."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from helpers.slurm_cluster import FINISHED, SlurmCluster, free_port, why_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.needs_root]

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO / "launch" / "slurm" / "pretrain.sbatch")
EVALUATE = str(REPO / "launch" / "slurm" / "evaluate.sbatch")
# The scripts' #SBATCH lines ask for GPUs; a CPU cluster overrides them on the command line.
CPU_NODES = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10")
TINY = ("--config", "demo", "train.stage1.micro_batch_size=4", "train.stage2.micro_batch_size=4",
        "train.log_every=1", "train.eval_at_end=false")
STAGE1_STEPS, STAGE2_STEPS = 8, 2  # 8: SIGUSR1 lands in stage 1 even with fast steps


@pytest.fixture(scope="module")
def cluster():
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(nodes=2, cpus_per_node=1).start()
    try:
        yield c
    finally:  # always: cancel the jobs, stop slurmd, slurmctld and munged
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory):
    """Where jobs are submitted from: default run dirs land here; the demo's relative shard paths
    resolve through a link to the checkout's shards."""
    d = tmp_path_factory.mktemp("submit")
    (d / "shards").symlink_to(REPO / "shards")
    return d


def submit(cluster, submit_dir, *args):
    # A free rendezvous port: the default (from the job id) could meet another test cluster's job.
    env = {"MSMEDCAP_ROOT": str(REPO), "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    return cluster.sbatch(*args, cwd=submit_dir, env=env)


def records(run: Path) -> list:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def explain(cluster, run: Path) -> str:
    return f"\n--- job.log\n{read(run / 'job.log')}\n{cluster.logs()}"


@pytest.fixture(scope="module")
def preempted_run(cluster, submit_dir):
    """pretrain.sbatch on 2 nodes, stopped by SIGUSR1 in stage 1, requeued, resumed to the end.
    Returns the job's id, its run dir, its state when requeued and at the end, and the summary the
    stopped run wrote."""
    job = submit(cluster, submit_dir, *CPU_NODES, PRETRAIN, *TINY, f"train.stage1.steps={STAGE1_STEPS}",
                 f"train.stage2.steps={STAGE2_STEPS}")
    run = submit_dir / "runs" / f"slurm-{job}"  # the default run dir, named by the job id
    deadline = time.monotonic() + 240
    while "\n" not in read(run / "metrics.jsonl"):  # stage 1 is under way
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), explain(cluster, run)
        assert time.monotonic() < deadline, "no training step after 240 s" + explain(cluster, run)
        time.sleep(0.2)
    # What SLURM does at --signal=B:USR1@120 before the time limit: signal the batch shell.
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    requeued = cluster.wait(job, timeout=180, until=lambda j: (j["Restarts"], j["JobState"]) == ("1", "PENDING")
                            or j["JobState"] in FINISHED)
    stopped = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    # A requeued job waits ~2 minutes before it is eligible again (SLURM's cleanup delay): skip it,
    # once the nodes have finished cleaning up after the first run (else: "Job credential revoked").
    cluster.wait_nodes_idle()
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    final = cluster.wait(job, timeout=300)
    return {"job": job, "run": run, "requeued": requeued, "final": final, "stopped": stopped}


def test_pretrain_is_preempted_requeued_and_resumed(cluster, submit_dir, preempted_run):
    job, run = preempted_run["job"], preempted_run["run"]
    requeued, final = preempted_run["requeued"], preempted_run["final"]
    assert requeued["Restarts"] == "1" and requeued["JobState"] == "PENDING", explain(cluster, run)
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        explain(cluster, run)
    log = (run / "job.log").read_text()
    assert f"job {job} restart 0: 2 ranks on n1 n2, rendezvous 127.0.0.1:" in log  # NodeAddr, not n1
    assert "msmedcap: SIGUSR1" in log and f"job {job} restart 1:" in log

    # The stopped run checkpointed stage 1 at the step where SIGUSR1 reached it, and did not export.
    assert preempted_run["stopped"], "the stopped run wrote no summary.json" + explain(cluster, run)
    stopped = preempted_run["stopped"]["stages"][0]
    assert stopped["stopped_by"] == "SIGUSR1" and 1 <= stopped["steps_done"] < STAGE1_STEPS, stopped
    checkpoint = run / "stage1" / "checkpoints" / f"step{stopped['steps_done']:08d}"
    assert (checkpoint / "trainer_state.json").is_file()

    # The requeued run continued from that checkpoint, in the same run dir, on both ranks.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    stage1, stage2 = summary["stages"]
    assert submit_dir / stage1["resumed_from"] == checkpoint and stage1["steps_done"] == STAGE1_STEPS
    assert not stage1["stopped_by"] and not stage2["stopped_by"]
    # metrics.jsonl reads as one uninterrupted run: every step once.
    assert [(r["stage"], r["step"]) for r in records(run)] == \
        [(1, s) for s in range(1, STAGE1_STEPS + 1)] + [(2, s) for s in range(1, STAGE2_STEPS + 1)]
    for stage, steps in ((1, STAGE1_STEPS), (2, STAGE2_STEPS)):
        assert (run / f"stage{stage}" / "checkpoints" / f"step{steps:08d}" / "trainer_state.json").is_file()
        assert (run / f"stage{stage}" / "export").is_dir()


def test_evaluate_on_two_nodes(cluster, submit_dir, preempted_run):
    assert preempted_run["final"]["JobState"] == "COMPLETED"
    job = submit(cluster, submit_dir, *CPU_NODES, EVALUATE, "--checkpoint", str(preempted_run["run"]),
                 "eval.max_samples=8", "eval.num_beams=1", "eval.max_len=8", "eval.gallery=false")
    info = cluster.wait(job, timeout=240)
    run = submit_dir / "runs" / f"slurm-{job}"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), explain(cluster, run)
    scores = json.loads((run / "scores.json").read_text())
    assert scores["world_size"] == 2 and scores["samples"]["total"] == 8
    assert scores["samples"]["per_rank"] == [4, 4]
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 8
    assert set(scores["overall"]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
