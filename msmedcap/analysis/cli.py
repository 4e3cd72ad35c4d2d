"""`msmedcap probe`: where a trained run's image information goes (msmedcap.analysis.probe). Registered
through the ``msmedcap.commands`` entry point, so the core's command line knows nothing of the analyses."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    r = subparsers.add_parser("probe", help="linear probes per branch, the LM's attention per prefix segment, "
                              "leave-one-branch-out", description="Where a trained run's image information goes: "
                              "logistic-regression probes of each findings field on each branch's frozen encoder "
                              "tokens, Q-Former queries and projected prefix (trained on data.train, tested on "
                              "data.eval); the share of the LM's attention on each prefix segment per layer; the "
                              "caption loss and greedy captions' findings with each branch's queries replaced by "
                              "their mean. Writes OUT/probe.json.")
    r.add_argument("run", metavar="RUN", help="a finished run directory (its newest export) or an export directory")
    r.add_argument("--train-samples", type=int, default=1200,
                   help="probe training samples from data.train, each spec its weight's share (default 1200)")
    r.add_argument("--eval-samples", type=int, default=0,
                   help="test samples from data.eval, each spec its weight's share (default 0 = all)")
    r.add_argument("--out", help="output directory for probe.json (default RUN/probe)")
    r.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    r.add_argument("--workers", type=int, default=0, help="data loader workers (default 0: decode in this process)")
    r.add_argument("--set", action="append", default=[], metavar="section.key=value", dest="overrides",
                   help="override data.* / eval.* of the run's config, e.g. --set data.train='[...]' (repeatable)")
    r.add_argument("--counterfactuals", action="store_true",
                   help="instead: how often the model prefers each reference caption to its one-finding counterfactual "
                        "(LM caption likelihood, each branch's ITC and ITM), per term set, on --train-samples of "
                        "data.train and on data.eval (msmedcap.analysis.counterfactual_probe)")
    r.set_defaults(func=run_probe)


def _error(msg: str) -> int:
    print(f"msmedcap probe: error: {msg}", file=sys.stderr)
    return 2


def run_probe(args) -> int:
    from msmedcap.analysis.probe import print_report, probe_run
    from msmedcap.eval.checkpoints import CheckpointError

    for name in ("train_samples", "batch_size"):
        if getattr(args, name) < 1:
            return _error(f"--{name.replace('_', '-')} must be at least 1")
    if args.counterfactuals:
        return _run_counterfactual_probe(args)
    try:
        result = probe_run(args.run, out=args.out, train_samples=args.train_samples, eval_samples=args.eval_samples,
                           batch_size=args.batch_size, device=args.device, overrides=args.overrides,
                           num_workers=args.workers)
    except (CheckpointError, FileNotFoundError) as e:
        return _error(str(e))
    print_report(result, as_markdown=args.markdown)
    return 0


def _run_counterfactual_probe(args) -> int:
    import json
    from pathlib import Path

    from msmedcap.analysis.counterfactual_probe import counterfactual_probe, markdown
    from msmedcap.eval.checkpoints import CheckpointError, is_export
    from msmedcap.eval.io import write_json

    try:
        result = counterfactual_probe(args.run, train_samples=args.train_samples, eval_samples=args.eval_samples,
                                      batch_size=args.batch_size, device=args.device, overrides=args.overrides)
    except (CheckpointError, FileNotFoundError) as e:
        return _error(str(e))
    given = Path(args.run)
    out = Path(args.out) if args.out else (Path(result["export"]) if is_export(given) else given) / "probe"
    write_json(out / "counterfactuals.json", result)
    print(markdown(result) if args.markdown else json.dumps(result, indent=1))
    return 0
