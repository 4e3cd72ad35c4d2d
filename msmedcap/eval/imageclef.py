"""The ImageCLEFmedical caption protocol (2025), as the task's own evaluator computes it.

Followed: github.com/taubsity/clef-caption-evaluation at commit ``EVALUATOR["commit"]``,
``caption_prediction/evaluator.py`` (caption prediction) and ``concept_detection/evaluator.py``
(concept detection). Per caption: lowercase, every digit run -> "number", ``string.punctuation``
removed (:func:`preprocess_caption`); then ROUGE-1 F-measure (rouge-score, no stemmer), BERTScore
F1 (bert-score, idf from the references) and the image-caption similarity (2.5 x max(cos, 0) of
the image and the raw predicted caption); 1.0 for a sample whose two raw captions are both empty;
each metric the mean over captions. relevance = mean(BERTScore, ROUGE-1, similarity), factuality =
mean(MedCAT concept F1, AlignScore), each only when all its parts ran.

What needs weights runs only from local files (cfg.eval.imageclef); a part without them is skipped
and the result says why. AlignScore and MedCAT (a licensed UMLS model pack) are not run here.
"""
from __future__ import annotations

import csv
import re
import string
from pathlib import Path
from typing import Mapping, Optional, Sequence

from msmedcap.config import ConfigError
from msmedcap.data.clip_preprocess import open_clip_name

EVALUATOR = {"repository": "https://github.com/taubsity/clef-caption-evaluation",
             "commit": "ce1308618eb379bc6d1650f6853c10efc628d952",
             "files": ["caption_prediction/evaluator.py", "concept_detection/evaluator.py"]}
SIMILARITY_WEIGHT = 2.5  # the evaluator's w in w * max(cos, 0)
METRICS = ("bertscore", "rouge1", "similarity", "bleu1", "concept_f1", "medcat", "alignscore")
AGGREGATES = {"relevance": ("bertscore", "rouge1", "similarity"), "factuality": ("medcat", "alignscore")}
NOT_BUILT_IN = {
    "medcat": "optional extra, not run by msmedcap: MedCAT with a UMLS model pack (licensed) extracting CUIs "
              "from both captions (the evaluator's medcat_scorer.py)",
    "alignscore": "optional extra, not run by msmedcap: AlignScore (AlignScore-base.ckpt on roberta-large, "
                  "nli_sp mode)",
}
IMAGE_SUFFIXES = (".jpg", ".png")  # the evaluator reads images/KEY.jpg

_DIGITS = re.compile(r"\d+")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def preprocess_caption(caption: str) -> str:
    """The evaluator's ``preprocess_caption`` (case-insensitive mode): lowercase, digit runs -> "number",
    punctuation removed."""
    return _DIGITS.sub("number", caption.lower()).translate(_NO_PUNCTUATION)


def _pairs(records: Sequence[Mapping]) -> dict:
    """key -> (reference, prediction); the task has one reference per image: the first is used."""
    return {str(r["key"]): (r["references"][0], r["prediction"]) for r in records}


def _per_caption(pairs: Mapping, compute) -> dict:
    """The evaluator's rule: 1 when both raw captions are empty, else ``compute(ref, pred)``."""
    return {k: (1.0 if not ref and not pred else float(compute(ref, pred))) for k, (ref, pred) in pairs.items()}


# --------------------------------------------------------------------------- text-only parts
def rouge1_scores(pairs: Mapping) -> dict:
    """ROUGE-1 F-measure per caption with rouge-score, no stemmer, on preprocessed captions (what the
    evaluator's ``evaluate.load("rouge")`` calls)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    return _per_caption(pairs, lambda ref, pred: scorer.score(preprocess_caption(ref), preprocess_caption(pred))
                        ["rouge1"].fmeasure)


def bleu1_scores(pairs: Mapping) -> dict:
    """BLEU-1 per caption: pycocoevalcap's BLEU on the preprocessed captions' words. (The pinned
    evaluator computes no BLEU since 2023; the number is msmedcap's, with the protocol's preprocessing.)"""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    def one(ref, pred):
        scorer = BleuScorer(n=1)
        scorer += (" ".join(preprocess_caption(pred).split()), [" ".join(preprocess_caption(ref).split())])
        score, _ = scorer.compute_score(option="closest", verbose=0)
        return score[0]

    return _per_caption(pairs, one)


# --------------------------------------------------------------------------- BERTScore
def bertscore_layer(model_dir: str, layers: Optional[int]) -> int:
    """The layer bert-score uses: the one given, else bert-score's own for a model of that directory's
    name (deberta-xlarge-mnli: 40), else the model's last."""
    if layers:
        return int(layers)
    from bert_score.utils import model2layers
    from transformers import AutoConfig

    name = Path(model_dir).name
    for known, layer in model2layers.items():
        if known.split("/")[-1] == name:
            return layer
    return AutoConfig.from_pretrained(model_dir).num_hidden_layers


def check_bertscore_model(model_dir: str) -> None:
    """A transformers model directory, or a ConfigError naming eval.imageclef.bertscore_model."""
    key = "eval.imageclef.bertscore_model"
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"{key}: {model_dir} is not a directory (a transformers model directory: config.json, "
                          "weights, tokenizer)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {model_dir} is not a transformers model ({str(e).splitlines()[0][:300]})") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"{key}: {model_dir} has no weights (*.safetensors or *.bin)")


def bertscore_scores(pairs: Mapping, model_dir: str, layers: Optional[int], device: str = "cpu",
                     batch_size: int = 64) -> dict:
    """BERTScore F1 per caption with bert-score's ``BERTScorer`` as the evaluator builds it (idf from the
    preprocessed references, no baseline rescaling), from a local model.

    bert-score encodes an empty sentence with ``tokenizer.build_inputs_with_special_tokens``, which
    transformers 5 tokenizers lack; its result for one is known without it: F1 0 where either side is
    empty after preprocessing, and in the idf an empty reference counts as the bare special tokens, the
    same token set as the separator token alone, which stands in for it there."""
    from bert_score import BERTScorer
    from bert_score.utils import get_tokenizer

    refs = {k: preprocess_caption(r) for k, (r, _) in pairs.items()}
    preds = {k: preprocess_caption(p) for k, (_, p) in pairs.items()}
    sep = get_tokenizer(model_dir, use_fast=False).sep_token
    scorer = BERTScorer(model_type=model_dir, num_layers=bertscore_layer(model_dir, layers), idf=True,
                        idf_sents=[r if r.strip() else sep for r in refs.values()], device=device,
                        batch_size=batch_size, nthreads=0)  # its idf Pool forks after torch's threads: can deadlock
    out = {k: (1.0 if not r and not p else 0.0) for k, (r, p) in pairs.items()}
    scored = [k for k in pairs if refs[k].strip() and preds[k].strip()]
    if scored:
        _, _, f1 = scorer.score([preds[k] for k in scored], [refs[k] for k in scored])
        out.update({k: float(v) for k, v in zip(scored, f1.tolist())})
    return out


# --------------------------------------------------------------------------- image-caption similarity
def image_file(images: str, key: str) -> Optional[Path]:
    for suffix in IMAGE_SUFFIXES:
        if (Path(images) / f"{key}{suffix}").is_file():
            return Path(images) / f"{key}{suffix}"
    return None


def load_open_clip(name: str, pretrained: Optional[str], device: str = "cpu") -> tuple:
    """(model, image preprocess, tokenizer) of a local open_clip model: a built-in name or config JSON
    with a weights file, or ``local-dir:DIR`` (open_clip_config.json + weights, BiomedCLIP's layout)."""
    import open_clip

    name = open_clip_name(name, key="eval.imageclef.clip_model")
    try:
        model, preprocess = open_clip.create_model_from_pretrained(name, pretrained=pretrained, device=device,
                                                                   return_transform=True)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise ConfigError(f"eval.imageclef.clip_model={name}, clip_pretrained={pretrained}: does not load "
                          f"({str(e).splitlines()[0][:300]})") from None
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def similarity_scores(pairs: Mapping, images: str, name: str, pretrained: Optional[str], device: str = "cpu") -> dict:
    """2.5 x max(cos, 0) between the image's and the raw predicted caption's embeddings, per caption."""
    import torch
    from PIL import Image

    model, preprocess, tokenizer = load_open_clip(name, pretrained, device)

    @torch.no_grad()
    def one(key, pred):
        with Image.open(image_file(images, key)) as img:
            image = preprocess(img.convert("RGB")).unsqueeze(0).to(device)
        v = model.encode_image(image)[0].double()
        c = model.encode_text(tokenizer([pred]).to(device))[0].double()
        cos = float(torch.dot(c, v) / (c.norm() * v.norm()))
        return SIMILARITY_WEIGHT * max(cos, 0.0)

    return {k: (1.0 if not ref and not pred else one(k, pred)) for k, (ref, pred) in pairs.items()}


# --------------------------------------------------------------------------- concepts
def read_concepts(path: str, key: str, predicted: bool) -> dict:
    """ID -> tuple of CUIs from the task's CSV (``ID,CUI;CUI;...``, a header row with "ID" skipped, as
    the concept-detection evaluator reads it); a malformed or repeated row is an error naming the line."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or "ID" in row[0]:
                continue
            if not (1 if predicted else 2) <= len(row) <= 2:
                raise ConfigError(f"{key}: {path}:{lineno}: expected 'ID,CUI;CUI;...' ({len(row)} columns)")
            if row[0] in out:
                raise ConfigError(f"{key}: {path}:{lineno}: ID {row[0]!r} repeats")
            concepts = tuple(c.strip() for c in row[1].split(";")) if len(row) > 1 else ()
            if len(concepts) != len(set(concepts)):
                raise ConfigError(f"{key}: {path}:{lineno}: a concept repeats for ID {row[0]!r}")
            out[row[0]] = concepts
    return out


def concept_f1(reference: Sequence[str], predicted: Sequence[str]) -> Optional[float]:
    """The concept-detection evaluator's per-image F1 (sklearn's binary f1_score over the union of the
    upper-cased CUIs, i.e. 2|R∩P| / (|R| + |P|)); None where the reference has none (left out of the mean)."""
    ref = {c.upper() for c in reference}
    pred = {c.upper() for c in predicted}
    if not ref:
        return None
    return 2 * len(ref & pred) / (len(ref) + len(pred))


def concept_scores(keys: Sequence[str], concepts: str, predicted: str) -> dict:
    refs = read_concepts(concepts, "eval.imageclef.concepts", predicted=False)
    preds = read_concepts(predicted, "eval.imageclef.concepts_predicted", predicted=True)
    return {k: concept_f1(refs[k], preds[k]) for k in keys}


# --------------------------------------------------------------------------- the protocol
def check_settings(settings, keys: Sequence[str] = ()) -> dict:
    """metric -> why it cannot run with these settings (None: it runs). Models are checked and files
    read here (a ConfigError naming the key), so that bad input fails before any scoring; ``keys``: the
    samples the images and concept files must cover."""
    s = settings
    for name in ("bertscore_model", "clip_pretrained", "images", "concepts", "concepts_predicted"):
        path = getattr(s, name)
        if path and not Path(path).exists():
            raise ConfigError(f"eval.imageclef.{name}: not found: {path}")
    clip = s.clip_model or ""
    local = clip[len("local-dir:"):] if clip.startswith("local-dir:") else clip if clip.endswith(".json") else None
    if local and not Path(local).exists():
        raise ConfigError(f"eval.imageclef.clip_model: not found: {local}")
    why: dict = {"rouge1": None, "bleu1": None, **NOT_BUILT_IN}
    if s.bertscore_model:
        check_bertscore_model(s.bertscore_model)
        why["bertscore"] = None
    else:
        why["bertscore"] = ("no eval.imageclef.bertscore_model / --bertscore-model (a local transformers model directory; the task "
                            "uses microsoft/deberta-xlarge-mnli)")
    if s.clip_model and s.images:
        lacking = [k for k in keys if image_file(s.images, k) is None]
        if lacking:
            raise ConfigError(f"eval.imageclef.images: {s.images} has no image for {len(lacking)} key(s), e.g. "
                              f"{lacking[0]!r} (looked for KEY{' or KEY'.join(IMAGE_SUFFIXES)})")
        why["similarity"] = None
    else:
        why["similarity"] = ("needs eval.imageclef.clip_model / --clip-model (a local open_clip model: BiomedCLIP in practice; the "
                             "task uses MedImageInsight) and eval.imageclef.images / --images (KEY.jpg files)")
    if s.concepts and s.concepts_predicted:
        for key, path, predicted in (("eval.imageclef.concepts", s.concepts, False),
                                     ("eval.imageclef.concepts_predicted", s.concepts_predicted, True)):
            found = read_concepts(path, key, predicted)
            lacking = [k for k in keys if k not in found]
            if lacking:
                raise ConfigError(f"{key}: {path} has no row for {len(lacking)} scored key(s), e.g. {lacking[0]!r}")
        why["concept_f1"] = None
    else:
        why["concept_f1"] = ("needs eval.imageclef.concepts and eval.imageclef.concepts_predicted / --concepts, --concepts-predicted "
                             "(CUI files in the concept-detection task's CSV format)")
    return why


def _mean(values) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def score_imageclef(records: Sequence[Mapping], settings, device: str = "cpu", why: Optional[dict] = None) -> dict:
    """The protocol on records (key, references, prediction) -> ``{"protocol", "evaluator", "metrics":
    {metric: {"ran", "value", "n", "model", "skipped"}}, "relevance": {...}, "factuality": {...},
    "per_sample": {key: {metric: value}}}``. ``settings``: a :class:`msmedcap.config.ImageclefConfig`;
    ``why``: what :func:`check_settings` said of them for these records, when the caller checked already."""
    pairs = _pairs(records)
    keys = list(pairs)
    why = check_settings(settings, keys) if why is None else why
    s = settings
    layer = bertscore_layer(s.bertscore_model, s.bertscore_layers) if why["bertscore"] is None else None
    run = {  # metric -> (compute, model, how)
        "rouge1": (lambda: rouge1_scores(pairs), "rouge-score", "ROUGE-1 F-measure, no stemmer"),
        "bleu1": (lambda: bleu1_scores(pairs), "pycocoevalcap", "BLEU-1 of the preprocessed words (msmedcap's; "
                  "the pinned evaluator computes no BLEU)"),
        "bertscore": (lambda: bertscore_scores(pairs, s.bertscore_model, layer, device), s.bertscore_model,
                      f"bert-score F1, idf from the references, layer {layer}"),
        "similarity": (lambda: similarity_scores(pairs, s.images, s.clip_model, s.clip_pretrained, device),
                       f"{s.clip_model} ({s.clip_pretrained})" if s.clip_pretrained else s.clip_model,
                       f"open_clip, {SIMILARITY_WEIGHT} x max(cos, 0) of image {s.images}/KEY and the raw caption"),
        "concept_f1": (lambda: concept_scores(keys, s.concepts, s.concepts_predicted), None,
                       f"per-image F1 of {s.concepts_predicted} vs {s.concepts}, images without reference CUIs "
                       "left out"),
    }
    metrics, per_sample = {}, {k: {} for k in keys}
    for metric in METRICS:
        if why.get(metric) is not None or metric not in run:
            metrics[metric] = {"ran": False, "value": None, "n": 0, "model": None, "how": None, "skipped": why[metric]}
            continue
        compute, model, how = run[metric]
        values = compute()
        for k, v in values.items():
            per_sample[k][metric] = v
        scored = [v for v in values.values() if v is not None]
        metrics[metric] = {"ran": True, "value": _mean(scored), "n": len(scored), "model": model, "how": how,
                           "skipped": None}
    out = {"protocol": "imageclef", "evaluator": EVALUATOR, "metrics": metrics}
    for name, parts in AGGREGATES.items():
        missing = [p for p in parts if not metrics[p]["ran"]]
        out[name] = ({"value": _mean(metrics[p]["value"] for p in parts), "parts": list(parts), "skipped": None}
                     if not missing else
                     {"value": None, "parts": list(parts), "skipped": f"{', '.join(missing)} did not run"})
    out["per_sample"] = per_sample
    return out
