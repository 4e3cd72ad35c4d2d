"""`msmedcap evaluate` (a trained captioner on the eval shards; launch/evaluate.py is its shim for the
deepspeed launcher), `msmedcap score` (score existing predictions) and `msmedcap caption` (caption image
files)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EVALUATE_DOC = """Evaluate a trained captioner: distributed generation, gather on rank 0, pycocoevalcap scores.

    msmedcap evaluate --checkpoint runs/demo                                 # one process
    deepspeed --num_gpus 4 launch/evaluate.py --checkpoint runs/demo        # 4 ranks, one job
    msmedcap evaluate --checkpoint runs/demo/.../export --data 'shards/roco-test-{000..009}.tar' \\
        eval.num_beams=5 eval.max_len=40
    msmedcap evaluate --compare runs/blip2 runs/sam-blip2 runs/msmedcap [--markdown] [--resamples 1000]
    msmedcap evaluate --checkpoint runs/roco eval.protocol=imageclef eval.imageclef.bertscore_model=DIR

--checkpoint takes an export directory (trainable.safetensors + config.yaml) or a run directory,
where the newest export is used. Writes predictions.jsonl, scores.json and gallery.html to --out
(default: <run dir>/eval, or <export>/eval). Options and overrides come in any order.
--compare also tests each run against the first (paired bootstrap CI, approximate randomization p);
eval.protocol=imageclef adds the ImageCLEFmedical caption protocol (docs/evaluation-protocols.md).
"""


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", metavar="RUN_DIR_OR_EXPORT")
    mode.add_argument("--compare", nargs="+", metavar="RUN", help="print the paper-style table of these runs")
    p.add_argument("--data", action="append", metavar="SPEC",
                   help="eval shard spec (brace patterns; repeatable); default: the config's data.eval")
    p.add_argument("--out", help="output directory (default: <run dir>/eval or <export>/eval)")
    p.add_argument("--markdown", action="store_true", help="--compare: print Markdown instead of tables")
    p.add_argument("--resamples", type=int, default=1000,
                   help="--compare: bootstrap resamples and randomization rounds of the significance tests "
                        "(default 1000; 0: no tests)")
    p.add_argument("--significance-seed", type=int, default=0, help="--compare: the tests' seed (default 0)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--dist-timeout-s", type=float, default=600.0,
                   help="how long a rank waits for a silent peer before giving up (as train.dist_timeout_s)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides of the checkpoint's config, e.g. eval.num_beams=1 eval.max_samples=100")
    p.set_defaults(func=run_evaluate, intermixed=True)


# `msmedcap score` flags -> eval.imageclef keys (docs/evaluation-protocols.md)
IMAGECLEF_FLAGS = {"bertscore_model": "a local transformers model directory for BERTScore (the task: "
                   "microsoft/deberta-xlarge-mnli)", "bertscore_layers": "its layer (default: bert-score's for "
                   "that model name, else the last)", "clip_model": "open_clip model name, config JSON or "
                   "local-dir:DIR for the image-caption similarity", "clip_pretrained": "its weights file",
                   "images": "directory of KEY.jpg / KEY.png images", "concepts": "reference CUIs (the concept "
                   "detection task's CSV)", "concepts_predicted": "predicted CUIs (the task's submission CSV)"}


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=("coco", "imageclef"), default="coco",
                   help="coco: pycocoevalcap + findings; imageclef: those plus the ImageCLEFmedical caption "
                        "protocol (docs/evaluation-protocols.md)")
    for name, what in IMAGECLEF_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int if name == "bertscore_layers" else str,
                       help=f"--protocol imageclef: {what}")


def imageclef_settings(args):
    """The eval.imageclef settings `msmedcap score`'s flags give."""
    from msmedcap.config import ImageclefConfig

    return ImageclefConfig(**{name: getattr(args, name) for name in IMAGECLEF_FLAGS})


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("evaluate", help="evaluate a trained captioner on the eval shards (distributed "
                              "generation, pycocoevalcap and findings scores, gallery)",
                              description=EVALUATE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluate_arguments(e)

    p = subparsers.add_parser("score", help="score predictions against references (pycocoevalcap, findings accuracy)",
                              description="Score {\"key\", \"prediction\"} JSONL lines against "
                              "{\"key\", \"captions\": [...]} JSONL lines: n-gram scores and findings accuracy "
                              "(per field, by the source's parser; lexicon P/R/F1 for free text); per "
                              "domain/source when the lines carry those fields. --protocol imageclef adds the "
                              "ImageCLEFmedical caption protocol (docs/evaluation-protocols.md).")
    p.add_argument("predictions", help="PRED.jsonl: {\"key\", \"prediction\"} per line (evaluate's "
                   "predictions.jsonl works as is)")
    p.add_argument("--refs", help="REFS.jsonl: {\"key\", \"captions\": [...]} per line; default: the "
                   "'references' field of the prediction lines")
    p.add_argument("--out", help="write the scores here (JSON)")
    p.add_argument("--spice", choices=("auto", "on", "off"), default="auto",
                   help="SPICE: when its models are installed (auto), required (on), or skipped (off)")
    add_protocol_arguments(p)
    p.set_defaults(func=run_score)

    c = subparsers.add_parser("caption", help="caption image files with a trained checkpoint",
                              description="Print one caption per image (PNG, JPEG; DICOM with pydicom).")
    c.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files, DICOM (.dcm) with pydicom")
    c.add_argument("--set", action="append", default=[], metavar="section.key=value", dest="overrides",
                   help="override the checkpoint's eval settings, e.g. --set eval.num_beams=1 (repeatable)")
    c.add_argument("--checkpoint", required=True, help="an export directory or a run directory (newest export)")
    c.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size of the checkpoint's config")
    c.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    c.add_argument("--json", action="store_true", help="print JSON lines {\"image\", \"caption\"}")
    c.set_defaults(func=run_caption)


def _error(cmd: str, msg: str) -> int:
    print(f"msmedcap {cmd}: error: {msg}", file=sys.stderr)
    return 2


def init_distributed(timeout_s: float | None = None) -> tuple:
    """(rank, world_size, device) from the launcher's environment (deepspeed, torchrun, srun), set up
    as the trainer's (msmedcap.train.world.init_world); a world of one has no process group."""
    from msmedcap.train.world import init_world

    world = init_world(timeout_s=timeout_s, cpu_threads=False, group_of_one=False)
    return world.rank, world.size, world.device


def run_evaluate(args) -> int:
    if args.compare:
        from msmedcap.eval.report import print_compare

        if args.resamples < 0:
            return _error("evaluate", "--resamples must be at least 0")

        from msmedcap.eval.io import InputError
        from msmedcap.eval.significance import print_compare_significance

        try:
            print_compare(args.compare, markdown=args.markdown)
            if args.resamples > 0 and len(args.compare) > 1:
                print_compare_significance(args.compare, resamples=args.resamples, seed=args.significance_seed,
                                           markdown=args.markdown)
        except (FileNotFoundError, ValueError, InputError) as e:
            return _error("evaluate", str(e))
        return 0

    from msmedcap.config import ConfigError
    from msmedcap.eval.checkpoints import CheckpointError, default_out_dir, find_export, load_for_eval
    from msmedcap.eval.scoring import JavaMissing, require_java

    try:
        require_java()  # before minutes of generation
        export = find_export(args.checkpoint)
        rank, world_size, device = init_distributed(getattr(args, "dist_timeout_s", None))
        model, cfg = load_for_eval(export, args.overrides, device, data=args.data)
        if cfg.eval.protocol == "imageclef":  # its models, before minutes of generation
            from msmedcap.eval.imageclef import check_settings

            check_settings(cfg.eval.imageclef)
    except (CheckpointError, JavaMissing, ConfigError) as e:
        return _error("evaluate", str(e))
    from msmedcap.eval.evaluate import evaluate

    out = Path(args.out) if args.out else default_out_dir(args.checkpoint, export)
    try:
        evaluate(model, cfg, out, rank=rank, world_size=world_size, checkpoint=str(export))
    except Exception as e:  # noqa: BLE001 - a lost peer: say so and leave (never a partial scores.json)
        from msmedcap.train.world import first_line, is_collective_failure, leave_now

        if not is_collective_failure(e):
            raise
        print(f"msmedcap evaluate: rank {rank}: lost contact with another rank, nothing written "
              f"({type(e).__name__}: {first_line(e)})", file=sys.stderr, flush=True)
        leave_now(3)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def run_score(args) -> int:
    from msmedcap.config import ConfigError
    from msmedcap.eval.io import InputError, read_predictions, read_references, write_json
    from msmedcap.eval.report import print_scores
    from msmedcap.eval.scoring import ScoringError, check_keys, score_records

    given = [f"--{n.replace('_', '-')}" for n in IMAGECLEF_FLAGS if getattr(args, n) is not None]
    if given and args.protocol != "imageclef":
        return _error("score", f"{', '.join(given)}: only with --protocol imageclef")
    try:
        preds = read_predictions(args.predictions)
        if args.refs:
            refs = {str(r["key"]): r for r in read_references(args.refs)}
            check_keys({k: r["captions"] for k, r in refs.items()}, {str(p["key"]): p for p in preds},
                       refs_name=args.refs, preds_name=args.predictions)
            records = [{**refs[str(p["key"])], **p, "references": refs[str(p["key"])]["captions"]} for p in preds]
        else:
            no_refs = [p["key"] for p in preds if not isinstance(p.get("references"), list)]
            if no_refs:
                raise InputError(f"{args.predictions}: {len(no_refs)} line(s) carry no 'references' list "
                                 f"(e.g. key {no_refs[0]!r}); pass --refs REFS.jsonl")
            records = preds
        if args.protocol == "imageclef":  # models and files checked before any scoring
            from msmedcap.eval.imageclef import check_settings

            settings = imageclef_settings(args)
            why = check_settings(settings, [str(r["key"]) for r in records])
        start = time.time()
        scores = score_records(records, spice=args.spice)
        if args.protocol == "imageclef":
            from msmedcap.eval.imageclef import score_imageclef

            scores["imageclef"] = score_imageclef(records, settings, why=why)
            scores["imageclef"].pop("per_sample")
    except (InputError, ScoringError, ConfigError) as e:
        return _error("score", str(e))
    scores.pop("per_sample")
    scores.pop("per_sample_findings")
    scores.update(predictions=args.predictions, references=args.refs, score_seconds=round(time.time() - start, 2))
    print_scores(scores, title=f"Scores: {args.predictions}")
    if args.out:
        write_json(args.out, scores)
    return 0


def run_caption(args) -> int:
    from msmedcap.eval.caption import CaptionError, caption_files

    try:
        results = caption_files(args.images, args.checkpoint, overrides=args.overrides,
                                batch_size=args.batch_size, device=args.device)
    except CaptionError as e:
        return _error("caption", str(e))
    import json

    for path, caption in results:
        print(json.dumps({"image": path, "caption": caption}) if args.json else f"{path}\t{caption}")
    return 0

