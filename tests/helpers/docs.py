"""Reading the README and docs/*.md as a reader would run them: code blocks, inline spans, commands,
links, the folder map; and checking a command against the real programs: `msmedcap` through its argparse
parser (msmedcap.cli.build_parser(), subparsers walked), launch/*.py scripts, `python -m msmedcap.*`
modules and the deepspeed launcher through the flags their own --help prints (``read_help``; that runs
them, so only the slow tests do), sbatch scripts as the `msmedcap` subcommand they run."""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from msmedcap.cli import build_parser
from msmedcap.config import config_fields

ROOT = Path(__file__).resolve().parents[2]  # tests/helpers/docs.py
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
    """Each command of a code block whose program is one of PROGRAMS, as tokens: continuation lines joined,
    comments dropped, `a && b` and `a; b` split (the right side of a pipe is another program's input),
    leading VAR=value assignments and [optional] brackets dropped. A line is a command line when it starts
    with a program or chains commands with && or ;: tables and output that name a program are not."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = line.split()
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        if not words or words[0] not in PROGRAMS and not ({"&&", ";"} & set(words) and PROGRAMS & set(words)):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # output in a code block, unless it starts like a command
            if words[0] in PROGRAMS:
                raise
            continue
        segment, piped = [], False
        for tok in tokens + ["&&"]:
            if tok in ("&&", ";", "|", "||"):
                while segment and re.match(r"^[A-Z_][A-Z0-9_]*=", segment[0]):
                    segment = segment[1:]
                if segment and segment[0] in PROGRAMS and not piped:
                    out.append(segment)
                segment, piped = [], tok in ("|", "||")
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


def check_with_help(key: tuple, tokens: list, problems: list, read_help: bool) -> None:
    if read_help:
        flags = help_flags(key)
        problems += [f"{tok.split('=')[0]} is not an option of {key[1]}" for tok in tokens
                     if tok.startswith("--") and tok.split("=")[0] not in flags]
    for i, tok in enumerate(tokens[:-1]):
        if tok.startswith("--"):
            check_option_value(tok, tokens[i + 1], problems)
    check_overrides(tokens, problems)


def check_script(script: str, tokens: list, problems: list, read_help: bool) -> None:
    if not (ROOT / script).is_file():
        problems.append(f"{script} does not exist")
    elif script in SCRIPT_SUBCOMMAND:
        check_with_parser(subparser_of(msmedcap_parser(), SCRIPT_SUBCOMMAND[script]), tokens, problems)
    elif script.startswith("launch/") and script.endswith(".py"):  # other scripts may not honour --help
        check_with_help(("script", script), tokens, problems, read_help)


def check_command(tokens: list, read_help: bool = False) -> list:
    """Problems with one command (empty: it exists as shown). Without ``read_help`` the flags of programs
    other than `msmedcap` (scripts, modules, the deepspeed launcher) are not checked, the rest is."""
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
                    check_with_help(("module", module), rest[2:], problems, read_help)
            elif module == "pytest":  # the test files it names must be there
                problems += [f"no test path {a}" for a in rest[2:]
                             if a.startswith("tests") and not (ROOT / a.split("::")[0]).exists()]
            # python -m pip / pycocoevalcap...: other projects' programs
        elif rest and rest[0].endswith(".py") and rest[0].split("/")[0] in ("launch", "tests"):
            check_script(rest[0], rest[1:], problems, read_help)
    elif program == "deepspeed":
        script = next((i for i, t in enumerate(rest) if t.endswith(".py")), None)
        launcher = rest if script is None else rest[:script]
        if read_help:
            flags = help_flags(("module", "deepspeed.launcher.runner"))
            problems += [f"{t} is not an option of the deepspeed launcher" for t in launcher
                         if t.startswith("--") and t not in flags]
        if script is not None:
            check_script(rest[script], rest[script + 1:], problems, read_help)
    elif program == "sbatch":  # options before the script are SLURM's own
        script = next((i for i, t in enumerate(rest) if t.endswith(".sbatch")), None)
        if script is None:
            problems.append("no .sbatch script")
        else:
            check_script(rest[script], rest[script + 1:], problems, read_help)
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


def known_flags(commands: list) -> set:
    """Every --flag of the `msmedcap` parsers and of the programs ``commands`` run (their --help read)."""
    known, stack = set(), [msmedcap_parser()]
    while stack:
        parser = stack.pop()
        known |= set(parser._option_string_actions)
        stack += [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # the --help runs, two at a time
        for flags in pool.map(help_flags, sorted(helped_programs(commands))):
            known |= flags
    return known
