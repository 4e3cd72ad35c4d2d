"""The README is a landing page that tells the truth about the tree (issue 22 item 3).

- it is at most 250 lines;
- every command it shows (code blocks and inline) and every command in a docs/*.md code block exists:
  `msmedcap SUB ...` against the real argparse parser (msmedcap.cli.build_parser(), subparsers walked:
  subcommand, each --flag, each value of an option with choices, each section.key=value override
  against the config's keys, each --config preset); `launch/*.py`, `python -m msmedcap.*` and
  `deepspeed` against the flags their own `--help` prints (run here: these are the real programs);
  `sbatch launch/slurm/*.sbatch ARGS` as the `msmedcap` subcommand its script runs; the test paths
  `python -m pytest` is given; every `python -m msmedcap.X` named anywhere (prose too) is a module;
- every launch/, ds_configs/, msmedcap/, docs/, tests/ and shards/demo path the README names exists;
- the folder map (the one fenced block under "## The folder map") names only paths that exist, and every
  subpackage of msmedcap/ and every folder of tests/;
- every relative link of the README and of docs/*.md resolves, anchors included (GitHub's heading slugs).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from msmedcap.cli import build_parser
from msmedcap.config import config_fields

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # this tree's msmedcap

# Shims whose parser is an `msmedcap` subcommand's (they call msmedcap.cli.main with it).
SCRIPT_SUBCOMMAND = {"launch/pretrain.py": ("train",), "launch/evaluate.py": ("evaluate",),
                     "launch/benchmark.py": ("bench",),
                     "launch/slurm/pretrain.sbatch": ("train",), "launch/slurm/evaluate.sbatch": ("evaluate",)}
PROGRAMS = {"msmedcap", "python", "python3", "deepspeed", "sbatch"}
PLACEHOLDERS = {"...", "section.key=value"}
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:pkg://)?(?:launch|ds_configs|msmedcap|docs|tests|\.ci|shards/demo)/[\w./*{}-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


# ---------------------------------------------------------------------------------------- markdown

def code_blocks(text: str) -> list:
    return FENCE.findall(text)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def inline_spans(text: str) -> list:
    return re.findall(r"`([^`\n]+)`", prose(text))


def folder_map_block(text: str) -> str:
    section = text.split("\n## The folder map", 1)
    assert len(section) == 2, "README.md has no '## The folder map' section"
    blocks = code_blocks(section[1].split("\n## ", 1)[0])
    assert len(blocks) == 1, "the folder map must be one fenced block"
    return blocks[0]


def github_slugs(markdown: str) -> set:
    """Anchors GitHub gives the headings: lowercase, punctuation dropped, spaces to hyphens, repeats -1, -2."""
    seen, slugs = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose(markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def expand_braces(pattern: str) -> list:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    return [x for i in range(int(a), int(b) + 1)
            for x in expand_braces(pattern[:m.start()] + str(i).zfill(len(a)) + pattern[m.end():])]


# ---------------------------------------------------------------------------------------- commands

def shell_commands(block: str) -> list:
    """Each command line of a code block whose program is one of PROGRAMS, as tokens: continuation lines
    joined, comments dropped, `a && b` split, leading VAR=value assignments and [optional] brackets dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = line.split()
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        if not PROGRAMS & set(words):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # prose or output in a code block, unless it starts like a command
            if words[0] in PROGRAMS:
                raise
            continue
        segment = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", ";", "|", "||"):
                while segment and re.match(r"^[A-Z_][A-Z0-9_]*=", segment[0]):
                    segment = segment[1:]
                if segment and segment[0] in PROGRAMS:
                    out.append(segment)
                segment = []
            else:
                tok = tok.strip("[]")
                if tok:
                    segment.append(tok)
    return out


@functools.lru_cache(maxsize=None)
def msmedcap_parser() -> argparse.ArgumentParser:
    return build_parser()


@functools.lru_cache(maxsize=None)
def config_keys() -> tuple:
    fields = config_fields()
    return frozenset(fields), frozenset(k for k, tp in fields.items() if tp is dict), \
        frozenset(k.split(".")[0] for k in fields)


def help_command(key: tuple) -> list:
    kind, name = key
    if kind == "module":
        return [sys.executable, "-m", name, "--help"]
    return [sys.executable, str(ROOT / name), "--help"]


@functools.lru_cache(maxsize=None)
def help_flags(key: tuple) -> frozenset:
    """The --flags a real program's --help prints (a program that cannot print its help fails the test)."""
    cmd = help_command(key)
    if key[0] == "module" and key[1].startswith("msmedcap."):
        source = Path(importlib.util.find_spec(key[1]).origin).read_text()
        if "ArgumentParser" not in source:  # it would not honour --help: it takes no options
            return frozenset()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=SUBPROCESS_ENV)
    assert run.returncode == 0, f"{' '.join(cmd[1:])} failed:\n{run.stdout}\n{run.stderr}"
    return frozenset(FLAG.findall(run.stdout))


def subparser_of(parser: argparse.ArgumentParser, names: tuple) -> argparse.ArgumentParser:
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def check_overrides(tokens: list, problems: list) -> None:
    keys, dict_keys, sections = config_keys()
    for tok in tokens:
        m = OVERRIDE.match(tok)
        if not m or tok in PLACEHOLDERS or m.group(1).split(".")[0] not in sections:
            continue
        key = m.group(1)
        parts = key.split(".")
        if key not in keys and not any(".".join(parts[:i]) in dict_keys for i in range(1, len(parts))):
            problems.append(f"override {key} is not a config key")


def check_with_parser(parser: argparse.ArgumentParser, tokens: list, problems: list) -> None:
    """tokens: what follows the (sub)command. Descends into subcommands, then checks flags, choices,
    presets, DeepSpeed config paths and overrides."""
    names = []
    while True:
        sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not sub:
            break
        positional = [t for t in tokens if not t.startswith("-")]
        if not positional or positional[0] not in sub[0].choices:
            problems.append(f"unknown subcommand {' '.join(names + positional[:1]) or '(none)'} "
                            f"(known: {', '.join(sub[0].choices)})")
            return
        names.append(positional[0])
        tokens = tokens[tokens.index(positional[0]) + 1:]
        parser = sub[0].choices[positional[0]]
    options = parser._option_string_actions
    for i, tok in enumerate(tokens):
        if not tok.startswith("--"):
            continue
        flag, _, inline = tok.partition("=")
        if flag not in options:
            problems.append(f"{flag} is not an option of {parser.prog}")
            continue
        value = inline or (tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("-") else None)
        action = options[flag]
        if value is None or action.nargs == 0:
            continue
        if action.choices:
            problems += [f"{flag} {v}: not one of {sorted(action.choices)}" for v in value.split("|")
                         if v not in action.choices]
        check_option_value(flag, value, problems)
    check_overrides(tokens, problems)


def check_option_value(flag: str, value: str, problems: list) -> None:
    if value.isupper() or "/" in value and value.split("/")[0] in ("runs", "data"):
        return  # a placeholder (RUN, FILE) or a path the user makes
    if flag in ("--config", "--preset") and not value.endswith((".yaml", ".yml")):
        if not (ROOT / "msmedcap" / "presets" / f"{value}.yaml").is_file():
            problems.append(f"{flag} {value}: no preset msmedcap/presets/{value}.yaml")
    if flag == "--deepspeed":
        path = ROOT / "msmedcap" / value[len("pkg://"):] if value.startswith("pkg://") else ROOT / value
        if not path.is_file():
            problems.append(f"--deepspeed {value}: no such file")


def check_with_help(key: tuple, tokens: list, problems: list) -> None:
    flags = help_flags(key)
    problems += [f"{tok.split('=')[0]} is not an option of {key[1]}" for tok in tokens
                 if tok.startswith("--") and tok.split("=")[0] not in flags]
    for i, tok in enumerate(tokens[:-1]):
        if tok.startswith("--"):
            check_option_value(tok, tokens[i + 1], problems)
    check_overrides(tokens, problems)


def check_script(script: str, tokens: list, problems: list) -> None:
    if not (ROOT / script).is_file():
        problems.append(f"{script} does not exist")
    elif script in SCRIPT_SUBCOMMAND:
        check_with_parser(subparser_of(msmedcap_parser(), SCRIPT_SUBCOMMAND[script]), tokens, problems)
    elif script.startswith("launch/") and script.endswith(".py"):  # other scripts may not honour --help
        check_with_help(("script", script), tokens, problems)


def check_command(tokens: list) -> list:
    """Problems with one command (empty: it exists as shown)."""
    problems = []
    program, rest = tokens[0], tokens[1:]
    if program == "msmedcap":
        check_with_parser(msmedcap_parser(), rest, problems)
    elif program in ("python", "python3"):
        if rest[:1] == ["-m"] and len(rest) > 1:
            module = rest[1]
            if module == "msmedcap.cli":
                check_with_parser(msmedcap_parser(), rest[2:], problems)
            elif module.startswith("msmedcap."):
                if importlib.util.find_spec(module) is None:
                    problems.append(f"no module {module}")
                else:
                    check_with_help(("module", module), rest[2:], problems)
            elif module == "pytest":  # the test files it names must be there
                problems += [f"no test path {a}" for a in rest[2:]
                             if a.startswith("tests") and not (ROOT / a.split("::")[0]).exists()]
            # python -m pip / pycocoevalcap...: other projects' programs
        elif rest and rest[0].endswith(".py") and rest[0].split("/")[0] in ("launch", "tests"):
            check_script(rest[0], rest[1:], problems)
    elif program == "deepspeed":
        script = next((i for i, t in enumerate(rest) if t.endswith(".py")), None)
        launcher = rest if script is None else rest[:script]
        flags = help_flags(("module", "deepspeed.launcher.runner"))
        problems += [f"{t} is not an option of the deepspeed launcher" for t in launcher
                     if t.startswith("--") and t not in flags]
        if script is not None:
            check_script(rest[script], rest[script + 1:], problems)
    elif program == "sbatch":  # options before the script are SLURM's own
        script = next((i for i, t in enumerate(rest) if t.endswith(".sbatch")), None)
        if script is None:
            problems.append("no .sbatch script")
        else:
            check_script(rest[script], rest[script + 1:], problems)
    return problems


def documented_commands() -> list:
    """(where, tokens) of every command in the README (code blocks and inline `msmedcap ...`) and in
    the docs pages' code blocks."""
    out = []
    for page in [README] + DOC_PAGES:
        text = page.read_text()
        for block in code_blocks(text):
            out += [(page.relative_to(ROOT), cmd) for cmd in shell_commands(block)]
    for span in inline_spans(README.read_text()):
        words = span.split()
        if len(words) > 1 and (words[0] in PROGRAMS - {"python", "python3"} or span.startswith("python launch/")):
            out += [(README.relative_to(ROOT), cmd) for cmd in shell_commands(span)]
    return out


def helped_programs(commands: list) -> set:
    """The programs whose --help the checks will read, so they can be run two at a time up front."""
    keys = set()
    for _, tokens in commands:
        for i, tok in enumerate(tokens):
            if tok.startswith("launch/") and tok.endswith(".py") and tok not in SCRIPT_SUBCOMMAND \
                    and (ROOT / tok).is_file():
                keys.add(("script", tok))
            if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("msmedcap.") \
                    and tokens[i + 1] != "msmedcap.cli" and importlib.util.find_spec(tokens[i + 1]):
                keys.add(("module", tokens[i + 1]))
        if tokens[0] == "deepspeed":
            keys.add(("module", "deepspeed.launcher.runner"))
    return keys


# ---------------------------------------------------------------------------------------- tests

def test_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the limit is {MAX_README_LINES}"
    text = README.read_text()
    assert "```bash\npython -m pytest -q tests\n```" in text, "the README's test command (.ci/run runs it) is gone"
    for page in ("training", "cluster", "model", "data", "evaluation", "demo", "extending", "benchmarks",
                 "reliability"):
        assert f"](docs/{page}.md" in text, f"the README does not link docs/{page}.md"


def test_every_documented_command_and_flag_exists():
    commands = documented_commands()
    assert len(commands) > 40, "the command extraction found too few commands to be checking anything"
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # the --help runs, two at a time
        list(pool.map(help_flags, sorted(helped_programs(commands))))
    problems = [f"{where}: `{shlex.join(tokens)}`: {p}" for where, tokens in commands for p in check_command(tokens)]
    assert not problems, "\n".join(problems)


def test_inline_flags_in_the_readme_exist():
    """`--flag` spans in the README's prose belong to some documented program."""
    known = set()
    stack = [msmedcap_parser()]
    while stack:
        parser = stack.pop()
        known |= set(parser._option_string_actions)
        stack += [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    for key in helped_programs(documented_commands()):
        known |= help_flags(key)
    spans = [s.split()[0].split("=")[0] for s in inline_spans(README.read_text()) if s.startswith("--")]
    assert spans, "no inline flags found: the extraction is broken"
    assert not [s for s in spans if s not in known], f"README flags no program has: {set(spans) - known}"


def test_paths_the_readme_names_exist():
    text = README.read_text().replace(folder_map_block(README.read_text()), "")
    missing = []
    for raw in sorted(set(REPO_PATH.findall(text))):
        path = raw.rstrip(".")
        path = "msmedcap/" + path[len("pkg://"):] if path.startswith("pkg://") else path
        for candidate in expand_braces(path):
            if not glob.glob(str(ROOT / candidate)):
                missing.append(raw)
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_every_module_the_docs_run_exists():
    """`python -m msmedcap.X` anywhere in the README or docs (prose too) names a module of the tree."""
    missing = sorted({f"{page.relative_to(ROOT)}: {module}" for page in [README] + DOC_PAGES
                      for module in re.findall(r"python3? -m\s+(msmedcap(?:\.\w+)+)", page.read_text())
                      if importlib.util.find_spec(module) is None})
    assert not missing, f"modules the docs run that do not exist: {missing}"


def folder_map_entries(block: str) -> list:
    """(path, is_dir) per entry: two spaces of indent per level; deeper-indented lines continue the
    description above them."""
    entries, stack = [], []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= 8:
            continue
        assert indent % 2 == 0, f"folder map: odd indent in {line!r}"
        name = line.split()[0]
        assert re.match(r"^[\w.-]+/?$", name), f"folder map: {name!r} is not a file or folder name"
        depth = indent // 2
        assert depth <= len(stack), f"folder map: {line!r} is indented below no folder"
        stack = stack[:depth] + [name.rstrip("/")]
        entries.append(("/".join(stack), name.endswith("/")))
    return entries


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


def test_the_cli_help_runs():
    """The README's `msmedcap` commands run here: the top-level help and a subcommand's."""
    for args in ([], ["plan"]):
        run = subprocess.run([sys.executable, "-m", "msmedcap.cli", *args, "--help"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT, env=SUBPROCESS_ENV)
        assert run.returncode == 0, run.stderr
        assert "usage: msmedcap" in run.stdout


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
    assert check_command(["python", "launch/nosuch.py"])
    assert check_command(["python", "-m", "pytest", "-q", "tests/nosuch_test.py"])
    assert check_command(["python", "-m", "pytest", "-q", "tests"]) == []
    assert check_command(["deepspeed", "--num_gpuz", "2", "launch/pretrain.py"])  # the launcher's own flags
    assert check_command(["python", "launch/compare_variants.py", "--seedz", "3"])  # a script's, from its --help
    assert check_command(["msmedcap", "train", "--deepspeed", "pkg://ds_configs/nosuch.json"])
    assert shell_commands("FOO=1 msmedcap plan \\\n  --gpus 8  # comment\ncat x && msmedcap score A [--out B]") == [
        ["msmedcap", "plan", "--gpus", "8"], ["msmedcap", "score", "A", "--out", "B"]]


def test_the_map_parser_and_slugs():
    block = "a/    x\n  b.py   y\n                  more of y\n  c/\n    d\ne\n"
    assert folder_map_entries(block) == [("a", True), ("a/b.py", False), ("a/c", True), ("a/c/d", False),
                                         ("e", False)]
    assert github_slugs("# Before launching: `msmedcap plan` (issue 21)\n## A\n## A\n") == {
        "before-launching-msmedcap-plan-issue-21", "a", "a-1"}
    assert expand_braces("x-{000..002}.tar") == ["x-000.tar", "x-001.tar", "x-002.tar"]
