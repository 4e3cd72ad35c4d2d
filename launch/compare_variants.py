#!/usr/bin/env python
"""The paper's Table 1 as one command: blip2, sam-blip2 and msmedcap over N seeds, mean ± sd.

Trains and evaluates the three variants on the same data and budget for N seeds, then prints mean ±
sd over the seeds per metric and findings field, overall and per domain.

    python launch/compare_variants.py                                # demo preset, 3 seeds
    python launch/compare_variants.py --seeds 5 --out runs/table1-long train.stage2.steps=3000
    python launch/compare_variants.py --aggregate-only --markdown    # the table of what has finished

Each run is the README's main command with ``model.variant=V train.seed=S
train.output_dir=OUT/V/seedS`` and the overrides given here, one subprocess after another (seed by
seed, the three variants in turn), always with ``--resume auto``: rerun the same command after a
stop and it continues where it stopped; a run whose ``eval/scores.json`` exists is skipped. A run
directory trained with another configuration is refused before anything starts. Then the runs'
scores are aggregated (msmedcap.analysis.table1): rich tables (Markdown with --markdown) on the
terminal, OUT/table1.json and OUT/table1.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "launch" / "pretrain.py"
OWN_KEYS = ("model.variant", "train.seed", "train.output_dir")  # this command sets them per run


def build_parser() -> argparse.ArgumentParser:
    from msmedcap.analysis.table1 import VARIANTS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Overrides (section.key=value) go to every run, e.g. train.stage2.steps=3000.")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=None,
                   help="seeds are FIRST..FIRST+N-1 (default: the config's train.seed, 42 in the presets: the "
                        "first msmedcap run then trains as the README's main command does)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                   help=f"variants to train (default: {' '.join(VARIANTS)})")
    p.add_argument("--out", default="runs/table1", help="root of the runs: OUT/VARIANT/seedS (default runs/table1)")
    p.add_argument("--config", default="demo", metavar="PRESET_OR_YAML", help="as for launch/pretrain.py (default demo)")
    p.add_argument("--deepspeed", default=None, metavar="JSON",
                   help="DeepSpeed JSON config for every run (default: launch/pretrain.py's, ds_configs/zero2.json)")
    p.add_argument("--launcher", default=None, metavar="CMD",
                   help="how to start launch/pretrain.py, e.g. 'deepspeed --num_gpus 8' (default: this "
                        "Python, one process)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--sources", action="store_true", help="also print a table per source (the JSON has them anyway)")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing: aggregate the runs that have finished")
    p.add_argument("--resamples", type=int, default=1000,
                   help="paired significance of each variant against the first, per seed: bootstrap resamples and "
                        "randomization rounds (default 1000; 0: no tests)")
    p.add_argument("--significance-seed", type=int, default=0, help="the significance tests' seed (default 0)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


class Refused(Exception):
    """A plan that cannot run (bad overrides, a run directory of another configuration)."""


def plan_runs(args) -> list:
    """[(variant, seed, run dir, overrides)] in training order; the configuration of every run is
    built and checked (and compared with an existing run directory's) before any training."""
    import yaml

    from msmedcap.config import ConfigError, load_config

    for o in args.overrides:
        key = o.split("=", 1)[0].strip()
        if key in OWN_KEYS:
            raise Refused(f"{key} is set per run by this command (use --variants, --seeds/--first-seed, --out)")
    try:
        first = args.first_seed if args.first_seed is not None else load_config(args.config, args.overrides).train.seed
    except ConfigError as e:
        raise Refused(f"config error: {e}") from None
    from msmedcap.analysis.table1 import run_dir

    runs = []
    for seed in range(first, first + args.seeds):
        for variant in args.variants:
            run = run_dir(args.out, variant, seed)
            overrides = [f"model.variant={variant}", f"train.seed={seed}", f"train.output_dir={run}", *args.overrides]
            try:
                cfg = load_config(args.config, overrides)
            except ConfigError as e:
                raise Refused(f"config error ({variant}, seed {seed}): {e}") from None
            if cfg.train.stage != "all" or not cfg.train.eval_at_end:
                raise Refused("Table 1 needs both stages and the evaluation: train.stage=all, train.eval_at_end=true")
            existing = run / "config.yaml"
            if existing.is_file():
                diff = _differences(yaml.safe_load(existing.read_text()) or {}, cfg.to_dict())
                if diff:
                    raise Refused(f"{run} was trained with another configuration ({'; '.join(diff[:5])}"
                                  f"{f'; and {len(diff) - 5} more' if len(diff) > 5 else ''}): remove it or "
                                  "choose another --out")
            runs.append((variant, seed, run, overrides))
    return runs


# Keys the trainer resolves and writes into the run's config.yaml (msmedcap.train.trainer: resolve_lm_dtype,
# the feature cache's directory): "auto" planned matches what it became there.
RESOLVED_AUTO = ("model.lm.dtype", "model.feature_cache")


def _differences(old, new, prefix: str = "") -> list:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    if new == "auto" and prefix[:-1] in RESOLVED_AUTO:
        return []
    return [] if old == new else [f"{prefix[:-1]}: {old!r} there, {new!r} now"]


def launcher_cmd(args) -> list:
    return shlex.split(args.launcher) if args.launcher else [sys.executable]


def train_all(args, runs: list) -> tuple:
    """Run every unfinished run in turn -> (exit status, [run records])."""
    from msmedcap.analysis.table1 import scores_file

    records = []
    for i, (variant, seed, run, overrides) in enumerate(runs, 1):
        rec = {"variant": variant, "seed": seed, "dir": str(run), "status": "done before", "seconds": None}
        records.append(rec)
        if scores_file(run).is_file():
            print(f"[{i}/{len(runs)}] {variant} seed {seed}: {scores_file(run)} exists, skipped", flush=True)
            continue
        cmd = [*launcher_cmd(args), str(PRETRAIN), "--config", args.config,
               *(["--deepspeed", args.deepspeed] if args.deepspeed else []), "--resume", "auto", *overrides]
        print(f"[{i}/{len(runs)}] {variant} seed {seed}: {shlex.join(cmd)}", flush=True)
        start = time.time()
        rc = subprocess.run(cmd, cwd=os.getcwd()).returncode
        rec["seconds"] = round(time.time() - start, 1)
        if rc != 0 or not scores_file(run).is_file():
            rec["status"] = f"failed (exit {rc})"
            print(f"compare_variants: {variant} seed {seed} failed (exit {rc}{', no scores.json' if rc == 0 else ''}); "
                  "the same command continues from where it stopped", file=sys.stderr)
            return (rc or 1), records
        rec["status"] = "trained"
        print(f"[{i}/{len(runs)}] {variant} seed {seed}: done in {rec['seconds']:.0f} s", flush=True)
    return 0, records


def report(args, seeds: list, records: list, command: str, console=None) -> dict:
    """Aggregate the runs' scores; print; write OUT/table1.json and OUT/table1.md."""
    from msmedcap.analysis.table1 import (aggregate, load_runs, significance_markdown, table1_markdown,
                                          table1_significance, table1_tables)
    from msmedcap.eval.io import write_json
    from msmedcap.atomic_files import atomic_write_text
    from msmedcap.eval.report import make_console

    runs, missing = load_runs(args.out, args.variants, seeds)
    agg = aggregate(runs)
    out = Path(args.out)
    result = {"command": command, "config": args.config, "overrides": args.overrides, "variants": args.variants, "seeds": seeds,
              "runs": records, "missing": [{"variant": v, "seed": s, "scores": f} for v, s, f in missing],
              "train_seconds": round(sum(r["seconds"] or 0 for r in records), 1), "table": agg}
    md = table1_markdown(agg, sources=args.sources)
    if args.resamples > 0 and len(args.variants) > 1:
        result["significance"] = table1_significance(args.out, args.variants, seeds, args.resamples,
                                                     args.significance_seed)
        significance_md = significance_markdown(result["significance"])
        md += "\n" + significance_md
    write_json(out / "table1.json", result)
    atomic_write_text(out / "table1.md", md + "\n")
    console = console or make_console()
    if args.markdown:
        console.print(md, markup=False, highlight=False)
    else:
        for t in table1_tables(agg, sources=args.sources):
            console.print(t)
        if result.get("significance"):
            console.print(significance_md, markup=False, highlight=False)
    if missing:
        console.print(f"[yellow]{len(missing)} run(s) without scores: "
                      + ", ".join(f"{v} seed {s}" for v, s, _ in missing) + "[/yellow]")
    trained = [r for r in records if r["seconds"] is not None]
    if trained:
        console.print(f"{len(trained)} run(s) trained and evaluated in {result['train_seconds'] / 60:.1f} min", highlight=False)
    console.print(f"wrote {out / 'table1.json'} and {out / 'table1.md'}", highlight=False)
    return result


def main(argv=None, console=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.seeds < 1 or args.resamples < 0:
        print("compare_variants: --seeds must be at least 1, --resamples at least 0", file=sys.stderr)
        return 2
    try:
        runs = plan_runs(args)
    except Refused as e:
        print(f"compare_variants: {e}", file=sys.stderr)
        return 2
    seeds = sorted({seed for _, seed, _, _ in runs})
    if args.aggregate_only:
        records = [{"variant": v, "seed": s, "dir": str(d), "status": "not run (--aggregate-only)", "seconds": None}
                   for v, s, d, _ in runs]
    else:
        rc, records = train_all(args, runs)
        if rc != 0:
            return rc
    report(args, seeds, records, shlex.join(["python", "launch/compare_variants.py", *argv]), console=console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
