"""The flags the README and docs/*.md show for programs other than `msmedcap` exist in those programs:
launch/*.py scripts, `python -m msmedcap.*` modules and the deepspeed launcher, each asked for its own
--help (real processes, hence slow); and the README's `msmedcap` commands run here (--help). The checks
that need no process are in tests/unit/test_readme.py (issue 22 item 3)."""
import shlex
import subprocess
import sys

import pytest
from helpers.docs import README, ROOT, SUBPROCESS_ENV, check_command, documented_commands, inline_spans, known_flags

pytestmark = pytest.mark.slow


def test_every_documented_flag_exists_in_its_program():
    commands = documented_commands()
    known_flags(commands)  # reads every program's --help, two at a time
    problems = [f"{where}: `{shlex.join(tokens)}`: {p}" for where, tokens in commands
                for p in check_command(tokens, read_help=True)]
    assert not problems, "\n".join(problems)


def test_inline_flags_in_the_readme_exist():
    """`--flag` spans in the README's prose belong to some program it shows."""
    known = known_flags(documented_commands())
    spans = [s.split()[0].split("=")[0] for s in inline_spans(README.read_text()) if s.startswith("--")]
    assert spans, "no inline flags found: the extraction is broken"
    assert not [s for s in spans if s not in known], f"README flags no program has: {set(spans) - known}"


def test_the_cli_help_runs():
    """`msmedcap --help` and an entry-point subcommand's help run from this tree."""
    for args in ([], ["demo", "encoders"]):
        run = subprocess.run([sys.executable, "-m", "msmedcap.cli", *args, "--help"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT, env=SUBPROCESS_ENV)
        assert run.returncode == 0, run.stderr
        assert "usage: msmedcap" in run.stdout


def test_the_help_checks_catch_a_wrong_flag():
    assert check_command(["deepspeed", "--num_gpuz", "2", "launch/pretrain.py"], read_help=True)
    assert check_command(["deepspeed", "--num_gpus", "2", "launch/pretrain.py"], read_help=True) == []
    assert check_command(["python", "launch/compare_variants.py", "--seedz", "3"], read_help=True)
    assert check_command(["python", "launch/compare_variants.py", "--seeds", "3"], read_help=True) == []
