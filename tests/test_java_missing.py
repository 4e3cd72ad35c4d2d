"""Without Java (a fresh machine has only Python and pip), scoring fails with what to install, and a
training run whose final evaluation would need it is refused before any work (issue 14)."""
import json
import subprocess
import sys

import pytest

from msmedcap.eval.scoring import JavaMissing, require_java, tokenize


@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")


def test_scoring_names_the_missing_java(no_java):
    with pytest.raises(JavaMissing, match="java not found on the PATH.*default-jre-headless"):
        tokenize({"a": ["a cat."]}, {"a": "a cat."})


def test_msmedcap_score_without_java_is_a_clear_error(tmp_path):
    preds, refs = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    preds.write_text(json.dumps({"key": "a", "prediction": "a cat."}) + "\n")
    refs.write_text(json.dumps({"key": "a", "captions": ["a cat."]}) + "\n")
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "msmedcap.cli", "score", str(preds), "--refs", str(refs)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "java not found" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_require_java_passes_where_java_is_installed():
    import shutil

    if shutil.which("java") is None:
        pytest.skip("no java here")
    require_java()


def test_training_that_would_end_in_scoring_is_refused_before_work(tmp_path):
    from pathlib import Path

    import os

    repo = Path(__file__).resolve().parent.parent
    # this machine's PATH without java (DeepSpeed's launcher path still needs ninja, the compilers, ...)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name != "java" and not (bin_dir / name).exists():
                    (bin_dir / name).symlink_to(os.path.join(d, name))
    env = {**os.environ, "PATH": str(bin_dir), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(repo / "launch" / "pretrain.py"), f"train.output_dir={tmp_path / 'run'}"],
                         env=env, capture_output=True, text=True, cwd=repo, timeout=300)
    assert out.returncode == 2 and "java not found" in out.stderr and "train.eval_at_end" in out.stderr, out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
