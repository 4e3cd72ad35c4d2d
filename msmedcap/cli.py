"""`msmedcap` console script. Each subcommand lives in the module that does its job; this file
only dispatches (modules expose ``add_parser(subparsers)`` and set ``func`` on their parser; installed
packages add commands through the ``msmedcap.commands`` entry point, as msmedcap.demo and
msmedcap.analysis do; a parser
whose defaults say ``intermixed=True`` takes options and positionals in any order) and turns a
ConfigError of any subcommand into exit status 2."""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

SUBCOMMAND_MODULES = [
    "msmedcap.train.cli",     # train
    "msmedcap.eval.cli",      # evaluate, score, caption, probe
    "msmedcap.data.cli",      # shards write / inspect
    "msmedcap.bench",         # bench
    "msmedcap.bench.plan",    # plan
    "msmedcap.export.cli",    # export
]
COMMAND_ENTRY_POINTS = "msmedcap.commands"  # each an add_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msmedcap", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # subcommand not built yet
                continue
            raise
        module.add_parser(sub)
    for ep in entry_points(group=COMMAND_ENTRY_POINTS):
        ep.load()(sub)
    parser.subcommand_parsers = sub.choices
    return parser


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    """The top-level parse; a subcommand marked ``intermixed`` is parsed by its own parser with
    ``parse_intermixed_args`` (argparse cannot intermix through a subparsers action), so overrides may
    come before, between or after its options. ``prog`` renames the subcommand (its shim's name)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = parser.subcommand_parsers.get(argv[0]) if argv else None
    if command is not None and prog:
        command.prog = prog
    if command is None or not command.get_default("intermixed"):
        return parser.parse_args(argv)
    args = command.parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv=None, prog=None, **settings) -> int:
    """Run a subcommand; ``settings`` are set on its arguments (a shim's defaults, e.g. launch/pretrain.py's
    default DeepSpeed config, the checkout's ds_configs/zero2.json)."""
    args = parse_args(argv, prog)
    for name, value in settings.items():
        setattr(args, name, value)
    from msmedcap.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"msmedcap: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
