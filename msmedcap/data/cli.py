"""`msmedcap shards write | inspect`."""
from __future__ import annotations

import argparse
import collections
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("shards", help="write or inspect WebDataset shards")
    sub = p.add_subparsers(dest="shards_command", required=True)

    w = sub.add_parser("write", help="turn a caption dataset into shards + manifest.json")
    w.add_argument("--from", dest="kind", required=True, choices=["jsonl", "folder", "csv", "coco", "roco", "medicat"])
    w.add_argument("input", help="jsonl file | image folder | CSV/TSV file | COCO captions JSON | ROCO captions.txt "
                                 "| MedICaT JSONL")
    w.add_argument("--images", help="image directory (default: next to the input; roco: images/, medicat: figures/, "
                                    "where figures are {pdf_hash}_{fig_uri})")
    w.add_argument("--out", required=True, help="output directory")
    w.add_argument("--domain", required=True, choices=["general", "medical"])
    w.add_argument("--source", help="source name in the metadata (default: the --from kind)")
    w.add_argument("--prefix", help="shard file prefix (default: SOURCE); files are PREFIX-000.tar, ...")
    w.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    w.add_argument("--coco-per", choices=["caption", "image"], default="caption",
                   help="coco: one sample per caption, or per image (first caption; all in json 'captions')")
    w.add_argument("--image-col", default="image", help="csv: the image column (a path, or an ID without extension)")
    w.add_argument("--caption-col", default="caption", help="csv: the caption column")
    w.add_argument("--id-col", help="csv: the column naming each sample (default: the image column)")
    w.add_argument("--delimiter", help="csv: field separator (default: tab for .tsv/.tab, else comma)")
    w.add_argument("--max-pixels", type=int, default=50_000_000, help="skip larger images")
    w.set_defaults(func=cmd_write)

    i = sub.add_parser("inspect", help="counts per domain/source, size, checksums against manifest.json")
    i.add_argument("specs", nargs="+", help="shard files or brace patterns (PATTERN::WEIGHT accepted)")
    i.set_defaults(func=cmd_inspect)


def cmd_write(args: argparse.Namespace) -> int:
    from msmedcap.data.shards import write_shards
    from msmedcap.data.sources import READERS, SourceError, to_samples

    if args.shard_size < 1:
        print("msmedcap shards write: --shard-size must be >= 1", file=sys.stderr)
        return 2
    source = args.source or args.kind
    kw = {"per": args.coco_per} if args.kind == "coco" else {}
    if args.kind == "csv":
        kw = {"image_col": args.image_col, "caption_col": args.caption_col, "id_col": args.id_col,
              "delimiter": args.delimiter}
    counts = collections.Counter()
    try:
        records = READERS[args.kind](args.input, args.images, **kw)
        samples = to_samples(records, args.domain, source, counts, args.max_pixels)
        names = write_shards(samples, args.out, args.prefix or source, shard_size=args.shard_size)
    except (SourceError, OSError) as e:
        print(f"msmedcap shards write: {e}", file=sys.stderr)
        return 1
    skipped = {k: v for k, v in counts.items() if k != "written"}
    print(f"wrote {counts['written']} samples to {len(names)} shard(s) in {args.out}"
          + (f"; skipped {sum(skipped.values())}: {skipped}" if skipped else ""))
    return 0 if names else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from msmedcap.data.shards import inspect_shards

    report = inspect_shards(args.specs)
    console = Console()
    table = Table("shard", "samples", "MB", "checksum")
    for s in report["shards"]:
        table.add_row(s["url"], str(s["samples"]), f"{s['bytes'] / 1e6:.2f}", s["checksum"])
    console.print(table)
    console.print(f"{report['samples']} samples, {report['bytes'] / 1e6:.2f} MB")
    console.print("domains: " + ", ".join(f"{k} {v}" for k, v in sorted(report["domains"].items())))
    console.print("sources: " + ", ".join(f"{k} {v}" for k, v in sorted(report["sources"].items())))
    if report["skipped"]:
        console.print(f"skipped (corrupt): {report['skipped']}")
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {problem}")
    return 1 if report["problems"] or report["skipped"] else 0
