"""The model card (``README.md`` in the hub's format: YAML metadata through huggingface_hub's
``ModelCardData``, then markdown) of an export: variant, base models and their licences, training data,
steps, the run's evaluation (scores, findings, the most-frequent-caption baseline), intended use and limits.
Everything comes from the run's config and, when found, its ``summary.json`` and ``eval/scores.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from msmedcap.config import Config

# Licences of the weights a config can name (their publishers' statements); anything else: "see its source".
LICENCES = {
    "EVA01-g-14": "MIT (EVA, BAAI; open_clip weights)",
    "sam:vit_b": "Apache-2.0 (segment-anything, Meta)", "sam:vit_l": "Apache-2.0 (segment-anything, Meta)",
    "sam:vit_h": "Apache-2.0 (segment-anything, Meta)",
    "facebook/opt": "OPT-175B licence agreement (non-commercial research; Meta)",
    "bert-base-uncased": "Apache-2.0 (Google)", "google-bert/bert-base-uncased": "Apache-2.0 (Google)",
    "Salesforce/blip2": "MIT (Salesforce BLIP-2)",
    "pkg://": "Apache-2.0 (msmedcap's demo stand-ins, pre-trained on its synthetic demo data)",
}
SCORES = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def licence(name: Optional[str]) -> str:
    if not name:
        return "-"
    for prefix, text in LICENCES.items():
        if name.startswith(prefix) or prefix in name:
            return text
    return "unknown: see its source"


def base_models(cfg: Config) -> list:
    """(part, weights, licence) of every frozen or warm-started part the model came from."""
    m = cfg.model
    rows = []
    if "clip" in m.branches:
        rows.append(("CLIP image encoder (frozen)", f"open_clip {m.clip.name} / {m.clip.pretrained}",
                     licence(m.clip.name if not str(m.clip.pretrained or "").startswith("pkg://") else "pkg://")))
    if "sam" in m.branches:
        rows.append(("SAM image encoder (frozen)", f"segment-anything {m.sam.type} / {m.sam.checkpoint}",
                     licence("pkg://" if str(m.sam.checkpoint or "").startswith("pkg://") else f"sam:{m.sam.type}")))
    rows.append(("language model (frozen)", f"OPT {m.lm.name_or_path or '(architecture only: ' + str(m.lm.config) + ')'}",
                 licence(m.lm.name_or_path)))
    if m.qformer.init_from:
        rows.append(("Q-Former initialisation", f"BERT {m.qformer.init_from}", licence(m.qformer.init_from)))
    if m.blip2_checkpoint:
        rows.append(("BLIP-2 checkpoint (CLIP branch, LM)", str(m.blip2_checkpoint), licence(str(m.blip2_checkpoint))))
    return rows


def find_summary(source: Path, export: Path) -> Optional[Path]:
    """The run's ``summary.json``: in the directory given, or above the export (``RUN/stage2/export``)."""
    for d in (source, *export.parents[:3]):
        if (d / "summary.json").is_file():
            return d / "summary.json"
    return None


def _read_json(path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def evaluation_section(summary: Optional[dict], run_dir: Optional[Path]) -> str:
    evaluation = (summary or {}).get("evaluation")
    if not evaluation:
        return "No evaluation was recorded with this run (its `summary.json` has none, or none was found).\n"
    scores = _read_json(evaluation.get("scores")) or (run_dir and _read_json(run_dir / "eval/scores.json"))
    baseline = run_dir and _read_json(run_dir / "eval/baseline_scores.json")
    lines = []
    if scores:
        n = scores.get("samples", {}).get("total")
        gen = scores.get("generation", {})
        lines += [f"Held-out evaluation of this run: {n} samples of {', '.join(f'`{s}`' for s in scores.get('data', []))}; "
                  f"generation: {', '.join(f'{k}={v!r}' for k, v in gen.items())}.", "",
                  "| | " + " | ".join(SCORES) + " |", "|---" * (len(SCORES) + 1) + "|"]
        rows = [("this model", scores.get("overall", {}))]
        rows += [(f"domain: {d}", s) for d, s in scores.get("domain", {}).items()]
        if baseline:
            rows.append(("baseline: most frequent training caption", baseline.get("overall", baseline)))
        for name, s in rows:
            lines.append(f"| {name} | " + " | ".join(_fmt(s.get(k)) for k in SCORES) + " |")
        findings = scores.get("overall", {}).get("findings", {}).get("fields", {})
        floor = ((baseline or {}).get("overall") or {}).get("findings", {}).get("fields", {})
        if findings:
            lines += ["", "Findings accuracy (per clinical field: the fact parsed from the caption against the reference's):",
                      "", "| field | accuracy | correct / n | baseline accuracy |", "|---|---|---|---|"]
            lines += [f"| {f} | {_fmt(v.get('accuracy'))} | {v.get('correct')} / {v.get('n')} | "
                      f"{_fmt(floor.get(f, {}).get('accuracy'))} |" for f, v in findings.items()]
    else:
        lines.append(f"CIDEr {_fmt(evaluation.get('CIDEr'))}, BLEU-4 {_fmt(evaluation.get('Bleu_4'))} "
                     "(the run's scores.json was not found).")
    lines += ["", f"Baseline (the most frequent training caption, {evaluation.get('baseline_caption')!r}, for every "
              f"image): CIDEr {_fmt(evaluation.get('baseline_CIDEr'))}, BLEU-4 {_fmt(evaluation.get('baseline_Bleu_4'))}."]
    return "\n".join(lines) + "\n"


def training_section(cfg: Config, summary: Optional[dict]) -> str:
    d, t = cfg.data, cfg.train
    lines = ["Training data (WebDataset shard specs `PATTERN::WEIGHT`):", ""]
    lines += [f"- train: `{s}`" for s in d.train] + [f"- eval: `{s}`" for s in d.eval]
    lines += ["", f"Stage-1 routing (which Q-Former each domain trains): {cfg.model.routing}.", ""]
    stages = (summary or {}).get("stages")
    if stages:
        lines += ["| stage | steps | loss first → last | stopped by |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['steps_done']}/{s['total_steps']} | {_fmt(s.get('first_loss'))} → "
                  f"{_fmt(s.get('last_loss'))} | {s.get('stopped_by') or '-'} |" for s in stages]
        lines.append(f"\n{summary.get('world_size')} rank(s), {_fmt(summary.get('seconds'))} s.")
    else:
        lines.append(f"Configured: stage 1 {t.stage1.steps} steps, stage 2 {t.stage2.steps} steps (train.stage={t.stage}); "
                     "no summary.json was found, so the steps done are not known.")
    return "\n".join(lines) + "\n"


TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

An image captioner trained with msmedcap after MSMedCap (SAM-guided dual-encoder
captioning, arXiv 2311.01004): frozen image encoder(s) → trainable Q-Former(s) → frozen OPT.
Variant **{{ variant }}** ({{ branches }}); {{ queries }} learned queries per Q-Former, {{ soft }} soft prompts;
prompt `{{ prompt }}`.

## How to load

{{ how_to_load }}

## Base models and licences

| part | weights | licence |
|---|---|---|
{{ base_rows }}

The licence of this model follows the most restrictive of these; the trainable weights are under {{ project_licence }}.

## Training

{{ training }}
## Evaluation

{{ evaluation }}
## Intended use

Research on medical image captioning: comparing variants, studying what the SAM branch adds, building
further experiments. Not a medical device.

## Limits

- A research captioner: it writes fluent text that can be wrong. It is not validated for diagnosis,
  triage or reporting; no caption may reach a patient or a clinical decision without a qualified reader.
- It learnt from figure captions of its training data; it reproduces their style, biases and errors and can
  omit or invent findings, sides and counts (the findings accuracy above measures exactly this).
- Scores are for the evaluation data named above; other modalities, institutions or populations can do worse.
- n-gram scores (BLEU, CIDEr) reward templates: compare with the baseline row before reading them as quality.
"""


def render_card(cfg: Config, how_to_load: str, summary_path: Optional[Path], repo_id: Optional[str] = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    summary = _read_json(summary_path) if summary_path else None
    m = cfg.model
    bases = [b for b in (m.blip2_checkpoint, m.lm.name_or_path, m.qformer.init_from)
             if b and "/" in str(b) and not str(b).startswith(("/", ".", "pkg://"))]  # hub ids, not local paths
    data = ModelCardData(license="other", library_name="transformers" if "Blip2" in how_to_load else "msmedcap",
                         pipeline_tag="image-to-text", base_model=bases or None,
                         tags=["msmedcap", "image-captioning", "medical", m.variant])
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, title=repo_id or f"msmedcap {m.variant}", variant=m.variant,
        branches=" + ".join({"clip": "CLIP", "sam": "SAM"}[b] for b in m.branches),
        queries=m.qformer.num_query_tokens, soft=m.lm.num_soft_prompts, prompt=m.lm.prompt, how_to_load=how_to_load,
        base_rows="\n".join(f"| {a} | {b} | {c} |" for a, b, c in base_models(cfg)), project_licence="Apache-2.0",
        training=training_section(cfg, summary),
        evaluation=evaluation_section(summary, summary_path.parent if summary_path else None))
    return str(card)
