#!/usr/bin/env python
"""Render the fault tests' own numbers (tests/integration/test_faults.py with MSMEDCAP_RELIABILITY_OUT=DIR) as
the Markdown table of docs/reliability.md.

    MSMEDCAP_RELIABILITY_OUT=runs/rel python -m pytest -q tests/integration/test_faults.py          # CI size
    MSMEDCAP_FAULTS_HEAVY=1 MSMEDCAP_RELIABILITY_OUT=runs/rel-heavy python -m pytest -q tests/integration/test_faults.py
    python launch/reliability_report.py runs/rel-heavy                                  # print the table
    python launch/reliability_report.py runs/rel-heavy --into docs/reliability.md --section heavy
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# test record name -> (fault, what must hold afterwards)
FAULTS = {
    "sigkill": ("SIGKILL at a named moment (inside checkpoint writes, mid-step, around exports) or at a "
                "random one, then `--resume auto`", "losses of every step and final weights bit-identical to an uninterrupted run"),
    "truncated_checkpoint": ("newest checkpoint's ZeRO partition truncated to half",
                             "file named; resumed from the previous checkpoint; losses identical"),
    "deleted_or_corrupted_checkpoint": ("a file deleted in the newest checkpoint, 16 bytes overwritten in the other",
                                        "both files named; refused (exit 2), no traceback"),
    "pickled_rng": ("a code-running pickle in `rng_rank0000.pt` (manifest rewritten to match)",
                    "refused (exit 2) naming the file and the class; payload not run"),
    "pickled_mp": ("a code-running pickle in DeepSpeed's `mp_rank_00_model_states.pt`",
                   "refused (exit 2) by the weights-only DeepSpeed loader; payload not run"),
    "rank_killed": ("rank 1 of 2 SIGKILLed after step 3", "rank 0 exits 3 with 'lost contact'; restart continues"),
    "rank_hung": ("rank 1 of 2 stopped (SIGSTOP) after step 3", "rank 0 gives up after train.dist_timeout_s, exit 3"),
    "disk_full": ("disk full during the step-8 checkpoint write", "clear message (exit 1), step-4 checkpoint verifies "
                  "and resumes"),
    "eval_rank_killed": ("rank 1 of 2 SIGKILLed at its 2nd evaluation batch",
                         "rank 0 exits 3; no scores.json / predictions.jsonl (an earlier one removed)"),
}


def rows(records: list) -> list:
    out = []
    for r in sorted(records, key=lambda r: list(FAULTS).index(r["test"]) if r["test"] in FAULTS else 99):
        fault, holds = FAULTS.get(r["test"], (r["test"], ""))
        tried, survived = r.get("tried", 0), r.get("survived", 0)
        measured = []
        if r["test"] == "sigkill":
            measured.append(f"{r.get('steps_compared')} steps compared")
            if r.get("random_kills_tried"):
                tried += r["random_kills_tried"]
                survived += r["random_kills_survived"]
                measured.append(f"incl. {r['random_kills_tried']} SIGKILLs of the process group at random moments "
                                f"({r.get('random_attempts', '?')} attempts, {r['random_kills_tried']} struck before "
                                "the run ended)")
            if r.get("random_kills_landed"):
                at = [sum(int(x) for x in re.findall(r"\d+", w)) for w in r["random_kills_landed"]]
                measured.append(f"random kills landed after logged step {', '.join(map(str, at))} of 10")
            points = ", ".join(k["fault"].split("@")[1] + "@" + k["fault"].split("@")[2] for k in r.get("kills", []))
            measured.append(f"points: {points}")
        for key, label in (("noticed_s", "noticed after {} s"), ("gave_up_s", "gave up after {} s"),
                           ("dist_timeout_s", "train.dist_timeout_s={}"), ("how", "{}"), ("note", "{}")):
            if r.get(key) is not None:
                measured.append(label.format(r[key]))
        out.append(f"| {fault} | {tried} | {survived} | {holds} | {'; '.join(measured)} |")
    return out


def table(directory: Path) -> str:
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    if not records:
        raise SystemExit(f"reliability_report: no records in {directory}")
    head = ["| fault | tried | survived | what had to hold | measured |", "|---|---:|---:|---|---|"]
    total = sum(r.get("tried", 0) + r.get("random_kills_tried", 0) for r in records)
    ok = sum(r.get("survived", 0) + r.get("random_kills_survived", 0) for r in records)
    return "\n".join(head + rows(records) + [f"| **all** | **{total}** | **{ok}** | | |"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", type=Path, help="the MSMEDCAP_RELIABILITY_OUT directory of a test run")
    p.add_argument("--into", type=Path, help="a Markdown file holding <!-- reliability:SECTION --> markers")
    p.add_argument("--section", default="ci")
    args = p.parse_args(argv)
    text = table(args.records)
    if not args.into:
        print(text)
        return 0
    doc = args.into.read_text()
    begin, end = f"<!-- reliability:{args.section} -->", f"<!-- /reliability:{args.section} -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        print(f"reliability_report: {args.into} has no {begin} ... {end} markers", file=sys.stderr)
        return 2
    args.into.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
