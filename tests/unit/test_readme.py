"""The README is a landing page that tells the truth about the tree (issue 22 item 3), checked without
running anything (tests/integration/test_readme_commands.py reads the other programs' --help):

- it is at most 250 lines, keeps the test command .ci/run runs, and links every docs page of the guide;
- every command it shows (code blocks and inline `msmedcap ...`) and every command in a docs/*.md code
  block exists: `msmedcap SUB ...` (also through launch/pretrain.py, evaluate.py, benchmark.py and the
  sbatch scripts, which run those subcommands) against the real parser, msmedcap.cli.build_parser():
  the subcommand, each --flag, each value of an option with choices, each --config preset and
  --deepspeed file, each section.key=value override against the config's keys; every launch/ script,
  `python -m msmedcap.*` module and `python -m pytest` test path exists;
- every launch/, ds_configs/, msmedcap/, docs/, tests/ and shards/demo path the README names exists;
- the folder map (the one fenced block under "## The folder map") names only what exists, and every
  folder of msmedcap/ and tests/;
- every relative link of the README and docs/*.md resolves, anchors included (GitHub's heading slugs).
"""
import glob
import importlib.util
import re
import shlex

import pytest
from helpers.docs import (DOC_PAGES, LINK, MAX_README_LINES, README, REPO_PATH, ROOT, check_command,
                          documented_commands, expand_braces, folder_map_block, folder_map_entries, github_slugs,
                          prose, shell_commands)

GUIDE = ("training", "cluster", "model", "data", "evaluation", "demo", "extending", "benchmarks", "reliability")


def test_readme_is_a_landing_page():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the limit is {MAX_README_LINES}"
    assert "```bash\npython -m pytest -q tests\n```" in text, "the README's test command (.ci/run runs it) is gone"
    assert not [p for p in GUIDE if f"](docs/{p}.md" not in text], "the README must link every page of the guide"


def test_every_documented_command_exists():
    commands = documented_commands()
    assert len(commands) > 40, "the command extraction found too few commands to be checking anything"
    problems = [f"{where}: `{shlex.join(tokens)}`: {p}" for where, tokens in commands for p in check_command(tokens)]
    assert not problems, "\n".join(problems)


def test_paths_the_readme_names_exist():
    text = README.read_text().replace(folder_map_block(README.read_text()), "")
    missing = []
    for raw in sorted(set(REPO_PATH.findall(text))):
        path = raw.rstrip(".")
        path = "msmedcap/" + path[len("pkg://"):] if path.startswith("pkg://") else path
        missing += [raw for candidate in expand_braces(path) if not glob.glob(str(ROOT / candidate))]
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_every_module_the_docs_run_exists():
    """`python -m msmedcap.X` anywhere in the README or docs (prose too) names a module of the tree."""
    missing = sorted({f"{page.relative_to(ROOT)}: {module}" for page in [README] + DOC_PAGES
                      for module in re.findall(r"python3? -m\s+(msmedcap(?:\.\w+)+)", page.read_text())
                      if importlib.util.find_spec(module) is None})
    assert not missing, f"modules the docs run that do not exist: {missing}"


def test_folder_map_matches_the_tree():
    entries = folder_map_entries(folder_map_block(README.read_text()))
    assert len(entries) > 20, "the folder map parsed to too few entries"
    wrong = [p + ("/" if d else "") for p, d in entries if not ((ROOT / p).is_dir() if d else (ROOT / p).is_file())]
    assert not wrong, f"the folder map names what the tree does not have: {wrong}"
    mapped = {p for p, _ in entries}
    unmapped = [f"{parent}/{d.name}/" for parent in ("msmedcap", "tests") for d in sorted((ROOT / parent).iterdir())
                if d.is_dir() and not d.name.startswith(("_", ".")) and not d.name.endswith(".egg-info")
                and f"{parent}/{d.name}" not in mapped]
    assert not unmapped, f"folders the map leaves out: {unmapped}"


@pytest.mark.parametrize("page", [README] + DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in github_slugs(dest.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


# --- the checker itself: it must catch what it is for ----------------------------------------------

def test_the_checks_catch_a_wrong_command():
    assert check_command(["msmedcap", "plan", "--config", "paper", "--gpus", "8"]) == []
    assert check_command(["msmedcap", "plann"])  # unknown subcommand
    assert check_command(["msmedcap", "plan", "--gpuz", "8"])  # unknown flag
    assert check_command(["msmedcap", "plan", "--config", "nosuchpreset"])
    assert check_command(["msmedcap", "train", "train.stage1.stepz=3"])  # unknown config key
    assert check_command(["msmedcap", "train", "model.lm.config.hidden_size=8"]) == []  # inside a dict field
    assert check_command(["msmedcap", "score", "P.jsonl", "--spice", "auto|sometimes"])  # not a choice
    assert check_command(["sbatch", "--nodes=2", "launch/slurm/pretrain.sbatch", "--resume", "auto"]) == []
    assert check_command(["sbatch", "launch/slurm/pretrain.sbatch", "--resumee", "auto"])  # pretrain's flags
    assert check_command(["deepspeed", "launch/pretrain.py", "--deepspeed", "pkg://ds_configs/nosuch.json"])
    assert check_command(["python", "launch/nosuch.py"])
    assert check_command(["python", "-m", "msmedcap.nosuch"])
    assert check_command(["python", "-m", "pytest", "-q", "tests/nosuch_test.py"])
    assert check_command(["python", "-m", "pytest", "-q", "tests"]) == []
    assert shell_commands("FOO=1 msmedcap plan \\\n  --gpus 8  # comment\ncat x && msmedcap score A [--out B]") == [
        ["msmedcap", "plan", "--gpus", "8"], ["msmedcap", "score", "A", "--out", "B"]]
    assert shell_commands("| blip2 | msmedcap |\necho a | msmedcap plan\nmsmedcap: error: x") == []  # not commands


def test_the_map_parser_and_slugs():
    block = "a/    x\n  b.py   y\n                  more of y\n  c/\n    d\ne\n"
    assert folder_map_entries(block) == [("a", True), ("a/b.py", False), ("a/c", True), ("a/c/d", False),
                                         ("e", False)]
    assert github_slugs("# Before launching: `msmedcap plan` (issue 21)\n## A\n## A\n") == {
        "before-launching-msmedcap-plan-issue-21", "a", "a-1"}
    assert expand_braces("x-{000..002}.tar") == ["x-000.tar", "x-001.tar", "x-002.tar"]
