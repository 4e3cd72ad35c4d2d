"""A job-wide SIGTERM (scancel, preemption) must reach the rank's handler without killing the
DataLoader workers, so the rank can still checkpoint."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys
    from msmedcap.config import load_config
    from msmedcap.data.loader import make_train_loader
    from msmedcap.train.signals import StopRequest

    cfg = load_config("demo", ["data.num_workers=1", "train.stage1.micro_batch_size=2"])
    stop = StopRequest()
    for step, batch in enumerate(make_train_loader(cfg, stage=1, rank=0, world_size=1)):
        if step == 1:
            print("ready", flush=True)
        if not stop.signum:
            stop_at = step
        if stop.signum and step >= stop_at + 3:  # read on after the signal: the worker must be alive
            print(f"stopped cleanly after step {step}", flush=True)
            sys.exit(0)
    """)


def test_job_wide_sigterm_spares_loader_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # what scancel does: every process of the job
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped cleanly" in out
    assert "killed by signal" not in err
