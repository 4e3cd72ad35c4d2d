"""Does a trained model tell a caption from its one-finding counterfactual? ``msmedcap probe RUN --counterfactuals``.

For each sample whose reference caption matches a term set (the run's ``model.stage1.counterfactuals`` sets,
the built-in radiology sets when it has none), its counterfactual in that set alone
(msmedcap.models.counterfactuals, seed 0), and the share of samples where the model prefers the reference:

- ``lm``: the frozen LM's teacher-forced caption log-likelihood, given the image (what captioning uses);
- per branch ``itc`` (query-text similarity) and ``itm`` (match probability): the stage-1 heads.

On the training specs (``--train-samples`` of them) and the eval specs: a preference at chance on both says
the model never fit the finding; on the eval specs only, that it did not generalise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SEED = 0


def _caption_loglik(model, queries: dict, captions: list) -> torch.Tensor:
    """Summed log-probability of each caption (with its end) under the LM, given the queries."""
    from msmedcap.models.lm_families import caption_end
    from msmedcap.tokenization import encode_lm_captions

    cap = model.captioner
    end = caption_end(model.cfg, cap.tokenizer)
    enc = encode_lm_captions(cap.tokenizer, captions, model.cfg.lm.max_caption_len, end)
    ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
    logp = cap.logits(queries, ids, mask).float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    return (logp * mask).sum(1)


@torch.no_grad()
def preferences(model, cfg, specs, limit: int = 0, batch_size: int = 64) -> dict:
    """``{set: {n, lm, branches: {branch: {itc, itm}}}}``: shares of samples preferring the reference."""
    from msmedcap.analysis.probe import quota_batches
    from msmedcap.models.stage1 import pair_similarity
    from msmedcap.tokenization import encode_qformer_text, load_qformer_tokenizer

    qtok = load_qformer_tokenizer(cfg.model.qformer.tokenizer)
    settings = cfg.model.stage1.counterfactuals
    makers = {name: settings.maker([name]) for name in settings.term_sets}
    wins: dict = {}
    for batch in quota_batches(cfg, specs, batch_size, limit):
        features = {b: model.encode(batch, b) for b in model.branches}
        embeds = {b: q.image_embeds(features[b].to(model.device)) for b, q in model.qformers.items()}
        queries = {b: q.queries(embeds[b]) for b, q in model.qformers.items()}
        image_feats = {b: F.normalize(q.vision_proj(queries[b]), dim=-1) for b, q in model.qformers.items()}
        captions = list(batch["caption"])
        for name, maker in makers.items():
            g = torch.Generator().manual_seed(SEED)
            made = [(i, maker.make(c, g)[0]) for i, c in enumerate(captions)]
            rows = [i for i, text in made if text is not None]
            if not rows:
                continue
            negatives = [text for _, text in made if text is not None]
            positives = [captions[i] for i in rows]
            index = torch.tensor(rows, device=model.device)
            k = len(rows)
            w = wins.setdefault(name, {"n": 0, "lm": 0, "branches": {b: {"itc": 0, "itm": 0} for b in model.branches}})
            w["n"] += k
            if model.captioner.lm is not None:
                q = {b: v[index] for b, v in queries.items()}
                w["lm"] += int((_caption_loglik(model, q, positives) > _caption_loglik(model, q, negatives)).sum())
            texts = encode_qformer_text(qtok, positives + negatives, cfg.model.qformer.max_text_len)
            ids, mask = texts["input_ids"].to(model.device), texts["attention_mask"].to(model.device)
            for b, qformer in model.qformers.items():
                text_feat = F.normalize(qformer.text_proj(qformer.text(ids, mask)[:, 0]), dim=-1)
                itc = pair_similarity(image_feats[b][index].repeat(2, 1, 1), text_feat)
                itm = qformer.itm_logits(embeds[b][index].repeat(2, 1, 1), ids, mask).float().softmax(-1)[:, 1]
                w["branches"][b]["itc"] += int((itc[:k] > itc[k:]).sum())
                w["branches"][b]["itm"] += int((itm[:k] > itm[k:]).sum())
    return {name: {"n": w["n"], "lm": w["lm"] / w["n"] if model.captioner.lm is not None else None,
                   "branches": {b: {h: v / w["n"] for h, v in heads.items()} for b, heads in w["branches"].items()}}
            for name, w in wins.items()}


def counterfactual_probe(run, train_samples: int = 600, eval_samples: int = 0, batch_size: int = 64,
                         device=None, overrides=()) -> dict:
    """Preferences on ``train_samples`` of data.train and on data.eval of a run directory or export."""
    from msmedcap.eval.checkpoints import find_export, load_for_eval

    overrides = list(overrides) + ["data.num_workers=0"]
    export = find_export(run)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_for_eval(export, overrides, device=dev)
    return {"export": str(export), "sets": list(cfg.model.stage1.counterfactuals.term_sets),
            "train": preferences(model, cfg, cfg.data.train, train_samples, batch_size),
            "eval": preferences(model, cfg, cfg.data.eval, eval_samples, batch_size)}


def markdown(result: dict) -> str:
    """One row per split and set: n, then the share preferring the reference per score."""
    splits = [s for s in ("train", "eval") if result[s]]
    first = next(iter(result[splits[0]].values()), None) if splits else None
    if first is None:
        return "no caption matched any term set"
    branches = list(first["branches"])
    head = ["split", "set", "n", "LM caption"] + [f"{b} {h.upper()}" for b in branches for h in ("itc", "itm")]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for split in splits:
        for name, r in result[split].items():
            cells = [split, name, str(r["n"]), "-" if r["lm"] is None else f"{r['lm']:.2f}"]
            cells += [f"{r['branches'][b][h]:.2f}" for b in branches for h in ("itc", "itm")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n*share of samples whose reference caption the model prefers to its counterfactual "
                               "(one finding of the set changed); 0.50 is chance*")
