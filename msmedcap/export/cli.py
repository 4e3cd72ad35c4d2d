"""`msmedcap export SOURCE (--hf | --bundle) OUT_DIR`: a trained export (or run directory) as a
transformers BLIP-2 directory (variant blip2) or a self-contained msmedcap model directory (any variant),
with a model card, optionally pushed to the Hugging Face Hub. Everything that can be refused is refused
before the model is built, and OUT_DIR appears complete or not at all."""
from __future__ import annotations

import logging
from pathlib import Path

from msmedcap.config import ConfigError

log = logging.getLogger(__name__)

HF_LOAD = """```python
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

model = Blip2ForConditionalGeneration.from_pretrained("{path}").eval()
processor = Blip2Processor.from_pretrained("{path}", backend="pil")  # msmedcap's resize, pixel for pixel
inputs = processor(images=Image.open("image.png").convert("RGB"), text={prompt!r}, return_tensors="pt")
with torch.no_grad():
    # BLIP-2's generate passes on only what it is given: generation_config.json holds the run's eval settings
    out = model.generate(**inputs, generation_config=model.generation_config)
caption = processor.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0].strip()
```
"""
BUNDLE_LOAD = """```python
import msmedcap
{download}
model, cfg = msmedcap.from_pretrained({path})  # every tensor from model.safetensors; no other weight file
```
or from the command line: `msmedcap caption DIR image.png`, `msmedcap evaluate --checkpoint DIR` (DIR: this directory).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a trained model: transformers BLIP-2 or a self-contained directory",
                       description=__doc__.splitlines()[0])
    p.add_argument("source", help="an export (trainable.safetensors + config.yaml), a run directory (its newest "
                                  "export) or an msmedcap model directory")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--hf", metavar="OUT_DIR", help="transformers Blip2ForConditionalGeneration directory "
                                                     "(variant blip2, no soft prompts, an EVA CLIP tower)")
    kind.add_argument("--bundle", metavar="OUT_DIR", help="self-contained msmedcap model directory (any variant): "
                                                         "msmedcap.from_pretrained, msmedcap caption/evaluate")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (once the new one is complete)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload OUT_DIR to this Hub repository (created if absent)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--endpoint", help="with --push-to-hub: a hub other than huggingface.co (default: HF_ENDPOINT)")
    p.set_defaults(func=run)


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty: give --overwrite to replace it")


def run(args) -> int:
    from msmedcap.atomic_files import atomic_directory
    from msmedcap.eval.checkpoints import CheckpointError, find_export, load_model_dir, read_config
    from msmedcap.export import card, hub

    out = Path(args.hf or args.bundle)
    check_out_dir(out, args.overwrite)
    token = None
    if args.push_to_hub:
        hub.check_repo_id(args.push_to_hub)
        token = hub.hub_token()
    try:
        export = find_export(args.source)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if args.hf:
        from msmedcap.export.hf_blip2 import check_expressible

        check_expressible(read_config(export))
    model, cfg = load_model_dir(export)
    model.eval()

    def write(tmp: Path) -> None:
        if args.hf:
            from msmedcap.export.hf_blip2 import write_hf_blip2

            write_hf_blip2(model, cfg, tmp)
            how = HF_LOAD.format(path=args.push_to_hub or out, prompt=cfg.model.lm.prompt)
        else:
            from msmedcap.export.bundle import write_bundle

            write_bundle(model, cfg, tmp)
            how = BUNDLE_LOAD.format(
                download=f"from huggingface_hub import snapshot_download\n\npath = snapshot_download({args.push_to_hub!r})"
                if args.push_to_hub else "", path="path" if args.push_to_hub else repr(str(out)))
        summary = card.find_summary(Path(args.source), export)
        (tmp / "README.md").write_text(card.render_card(cfg, how, summary, args.push_to_hub), encoding="utf-8")

    atomic_directory(out, write, overwrite=args.overwrite)
    print(f"exported {cfg.model.variant} ({'transformers BLIP-2' if args.hf else 'msmedcap model directory'}) "
          f"from {export} to {out}")
    if args.push_to_hub:
        url = hub.push_folder(out, args.push_to_hub, token, endpoint=args.endpoint, private=args.private)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0
