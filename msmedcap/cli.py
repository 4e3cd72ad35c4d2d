"""`msmedcap` console script. Each subcommand lives in the module that does its job; this file
only dispatches (modules expose ``add_parser(subparsers)`` and set ``func`` on their parser)."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = [
    "msmedcap.data.cli",      # shards write / inspect / demo
    "msmedcap.eval.cli",      # score, caption, probe
    "msmedcap.bench",         # bench
]


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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from msmedcap.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"msmedcap: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
