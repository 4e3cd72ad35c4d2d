"""Where the image's information goes: ``msmedcap probe RUN``.

Three measurements on a trained run (or an export), each reproducible from the run alone:

1. **Linear probes.** For each branch, a logistic regression (standardised features, L2 chosen on a
   seeded 20 % split of the probe's training samples, LBFGS; plain torch) reads each findings field
   of the reference caption (msmedcap.eval.findings: modality, lesion present, count, size, side,
   margin; background, objects; the lexicon's modality/laterality for free-text sources) from three
   representations: the frozen encoder's tokens, the Q-Former's query outputs and the branch's
   projected prefix (all flattened). Trained on ``cfg.data.train`` (each spec its weight's share of
   ``--train-samples``, read once, in order), tested on ``cfg.data.eval``; next to each field's
   majority-class rate and the run's own captions' accuracy (``eval/predictions.jsonl``).
2. **Where the LM looks.** Teacher-forced on the eval samples, the share of attention mass that the
   positions predicting caption tokens (the prompt's last token, then every caption token but the
   last) put on each prefix segment (soft prompts, each branch's queries, bos+prompt, the caption
   itself), per LM layer, averaged over heads, then over a sample's positions, then over samples.
3. **Leave-one-branch-out.** Each branch's queries replaced by their mean over the eval set (the
   projection is affine, so this is the mean of its projected prefix); the change in teacher-forced
   caption loss and in the per-field accuracy of greedy captions says what each branch contributes.
   ``all`` replaces every branch: the image-blind floor.

Encoder features are computed once per sample, everything runs under no_grad; OUT/probe.json holds
every number (layout in :func:`probe_run`).
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

REPRESENTATIONS = ("encoder", "queries", "prefix")
REPRESENTATION_HELP = {"encoder": "frozen encoder tokens", "queries": "Q-Former query outputs",
                       "prefix": "projected prefix (LM input)"}
SKIP_FIELDS = ("lesion_all_four",)  # derived from the other fields' verdicts, not a label of the image
L2_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MAX_DIM = 8192  # wider features (paper-sized encoder tokens) go through a seeded count sketch
SEED = 0


# --------------------------------------------------------------------------- labels
def sample_labels(source: str, caption: str) -> Optional[dict]:
    """{field: label string} of one reference caption; None when its grammar does not parse it.
    Sources with a parser: its fields (lesion details only where there is a lesion); others: the
    lexicon's modality and laterality terms (``lexicon_modality``, ...) where the caption names some."""
    from msmedcap.eval.findings import lexicon_terms, parser_for

    parser = parser_for({"source": source})
    if parser is None:
        return {f"lexicon_{cat}": "+".join(terms) for cat, terms in lexicon_terms(caption).items() if terms}
    values = parser.strict(caption)
    if values is None:
        return None
    out = {}
    for f in parser.fields:
        if f in SKIP_FIELDS or not parser.applies(f, values) or values.get(f) is None:
            continue
        v = values[f]
        out[f] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def field_order(fields: Iterable[str]) -> list:
    from msmedcap.eval.findings import registered_fields

    order = registered_fields()
    return sorted(set(fields), key=lambda f: (order.index(f) if f in order else len(order), f))


# --------------------------------------------------------------------------- the probe
def count_sketch(x: torch.Tensor, dim: int, seed: int = SEED) -> torch.Tensor:
    """``[N, D] -> [N, dim]``: each input coordinate added, with a seeded random sign, to a seeded
    random bucket (a linear map that keeps inner products in expectation)."""
    g = torch.Generator().manual_seed(seed + x.shape[1])
    bucket = torch.randint(0, dim, (x.shape[1],), generator=g)
    sign = torch.randint(0, 2, (x.shape[1],), generator=g).to(x.dtype) * 2 - 1
    return torch.zeros(x.shape[0], dim, dtype=x.dtype).index_add_(1, bucket, x * sign)


def encode_labels(y_train: Sequence[str], y_test: Sequence[str]) -> tuple:
    """Label strings -> ``(train [N, G], test [M, G], group sizes)`` class indices of G softmax heads.

    A plain field is one head over the training labels. A multiset field (labels that are JSON lists
    of ``[count, attribute...]`` items, e.g. the demo's objects ``[[2, "red", "circle"], ...]``) gets
    one head per attribute tuple seen in training, whose classes are the counts seen for it (0 where
    a sample lacks it): the probe states the multiset, right only when every head is. A test value
    no head can state (a label or a count never seen in training) is -1: counted wrong."""
    def multiset(y):
        try:
            v = json.loads(y)
        except (TypeError, ValueError):
            return None
        if isinstance(v, list) and all(isinstance(i, list) and i and isinstance(i[0], int) for i in v):
            counts: dict = {}
            for i in v:
                counts[tuple(i[1:])] = counts.get(tuple(i[1:]), 0) + i[0]
            return counts
        return None

    parsed_train = [multiset(y) for y in y_train]
    if y_train and all(m is not None for m in parsed_train):
        parsed_test = [multiset(y) for y in y_test]
        keys = sorted({k for m in parsed_train for k in m}, key=str)
        classes = [sorted({m.get(k, 0) for m in parsed_train}) for k in keys]
        index = [{c: i for i, c in enumerate(cs)} for cs in classes]

        def encode(m):
            if m is None or set(m) - set(keys):
                return [-1] * len(keys)
            return [index[g].get(m.get(k, 0), -1) for g, k in enumerate(keys)]

        train = torch.tensor([encode(m) for m in parsed_train], dtype=torch.long)
        test = torch.tensor([encode(m) for m in parsed_test], dtype=torch.long).view(-1, len(keys))
        return train, test, [len(c) for c in classes]
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    train = torch.tensor([[index[c]] for c in y_train], dtype=torch.long).view(-1, 1)
    test = torch.tensor([[index.get(c, -1)] for c in y_test], dtype=torch.long).view(-1, 1)
    return train, test, [len(classes)]


class _Logistic:
    """Logistic regression with softmax heads over column groups (``sizes``) on standardised ``z``:
    mean over samples of the heads' summed cross-entropy + ``l2 * ||W||^2`` (bias free), LBFGS.
    With more features than samples it solves the same problem in its kernel form (W = Z^T A, the
    representer theorem), which is cheaper there. ``fit`` warm-starts from the previous solution."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor, sizes: Sequence[int], max_iter: int):
        self.z, self.y, self.max_iter = z, y, max_iter
        self.cuts = [0, *torch.tensor(list(sizes)).cumsum(0).tolist()]
        n, d = z.shape
        self.dual = d > n
        self.gram = z @ z.T if self.dual else None
        self.a = torch.zeros(n if self.dual else d, self.cuts[-1], dtype=z.dtype)
        self.b = torch.zeros(self.cuts[-1], dtype=z.dtype)

    def _heads(self, logits: torch.Tensor) -> list:
        return [logits[:, s:e] for s, e in zip(self.cuts[:-1], self.cuts[1:])]

    def fit(self, l2: float) -> "_Logistic":
        a = self.a.clone().requires_grad_(True)
        b = self.b.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([a, b], lr=1, max_iter=self.max_iter, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            za = self.gram @ a if self.dual else self.z @ a
            penalty = (a * za).sum() if self.dual else (a * a).sum()
            loss = sum(F.cross_entropy(h + bh, self.y[:, g], reduction="sum")
                       for g, (h, bh) in enumerate(zip(self._heads(za), self._heads(b[None])))) / len(self.y)
            loss = loss + l2 * penalty
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.a, self.b = a.detach(), b.detach()
        return self

    def predict(self, z_test: torch.Tensor) -> torch.Tensor:
        """[M, G] class index per head."""
        w = self.z.T @ self.a if self.dual else self.a
        return torch.stack([h.argmax(1) for h in self._heads(z_test @ w + self.b)], 1)


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    return float((pred == y).all(1).float().mean()) if len(y) else None


def probe_accuracy(x_train: torch.Tensor, y_train: Sequence[str], x_test: torch.Tensor, y_test: Sequence[str],
                   l2_grid: Sequence[float] = L2_GRID, max_iter: int = 100, seed: int = SEED) -> dict:
    """Held-out accuracy of a linear probe reading labels ``y`` from features ``x``.

    Features are standardised with the training samples' mean and sd, then scaled by 1/sqrt(dim)
    (so one L2 grid fits any width); the L2 weight is the grid's best on a seeded 20 % validation
    split of the training samples (walked from strong to weak, each fit warm-started; ties go to the
    heads' mean accuracy, then to the stronger L2), then the probe is refitted on all of them.
    Labels as :func:`encode_labels`; a test label never seen in training counts wrong. Returns
    ``{"accuracy", "l2", "classes", "heads"}`` and, with several heads, ``head_accuracy`` (their mean
    accuracy over the test samples)."""
    ytr, yte, sizes = encode_labels(list(y_train), list(y_test))
    info = {"classes": len(set(y_train)), "heads": len(sizes)}
    if not len(ytr) or all(k < 2 for k in sizes):  # nothing to learn: every head has one class
        return {"accuracy": _accuracy(torch.zeros_like(yte), yte), "l2": None, **info}
    x_train, x_test = x_train.double(), x_test.double()
    mean, sd = x_train.mean(0), x_train.std(0, unbiased=False)
    scale = (sd + 1e-6) * math.sqrt(x_train.shape[1])
    ztr, zte = (x_train - mean) / scale, (x_test - mean) / scale
    n = len(ytr)
    grid = sorted(l2_grid, reverse=True)
    best = grid[len(grid) // 2]
    if n >= 10 and len(grid) > 1:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, n // 5)
        val, fit = perm[:n_val], perm[n_val:]
        model = _Logistic(ztr[fit], ytr[fit], sizes, max_iter)
        scores = []
        for l2 in grid:  # exact accuracy, then the heads' mean accuracy, then the stronger L2
            pred = model.fit(l2).predict(ztr[val])
            scores.append((_accuracy(pred, ytr[val]), float((pred == ytr[val]).float().mean()), l2))
        best = max(scores)[2]
    model = _Logistic(ztr, ytr, sizes, max_iter).fit(best)
    pred = model.predict(zte)
    out = {"accuracy": _accuracy(pred, yte), "l2": best, **info}
    if len(sizes) > 1:
        out["head_accuracy"] = float((pred == yte).float().mean()) if len(yte) else None
    return out


def majority(y_train: Sequence[str], y_test: Sequence[str]) -> dict:
    """The most frequent training label (ties: the first in sorted order) and its share of the test labels."""
    counts: dict = {}
    for y in y_train:
        counts[y] = counts.get(y, 0) + 1
    label = min(counts, key=lambda c: (-counts[c], c)) if counts else None
    rate = sum(y == label for y in y_test) / len(y_test) if y_test else None
    return {"label": label, "rate": rate}


# --------------------------------------------------------------------------- reading the shards
def _slice(batch: dict, n: int) -> dict:
    return {k: (v[:n] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}


def quota_batches(cfg, specs: Sequence[str], batch_size: int, limit: int = 0):
    """Batches of every spec in turn, each read once in order through ``make_eval_loader``; with
    ``limit`` > 0 each spec contributes ``limit * weight / sum(weights)`` samples (fewer if it has fewer)."""
    from msmedcap.data.shard_spec import split_weighted_spec
    from msmedcap.data.loader import make_eval_loader

    weights = [split_weighted_spec(s)[1] for s in specs]
    quotas = [0] * len(specs)
    if limit > 0:  # largest remainder, so the quotas add up to the limit
        raw = [limit * w / sum(weights) for w in weights]
        quotas = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: quotas[i] - raw[i])[: limit - sum(quotas)]:
            quotas[i] += 1
    for spec, quota in zip(specs, quotas):
        if limit > 0 and quota == 0:
            continue
        taken = 0
        for batch in make_eval_loader(cfg, [spec], 0, 1, batch_size):
            if quota:
                batch = _slice(batch, quota - taken)
            taken += len(batch["key"])
            yield batch
            if quota and taken >= quota:
                break


@torch.no_grad()
def collect(model, cfg, specs: Sequence[str], limit: int = 0, batch_size: int = 64, keep_queries: bool = False,
            max_dim: int = MAX_DIM) -> dict:
    """One pass over ``specs``: per sample its labels, and per branch the three representations
    (float32, CPU, flattened; count-sketched to ``max_dim`` where wider, e.g. paper-sized encoder
    tokens). With
    ``keep_queries`` also the query outputs (their own dtype) and the LM's caption ids for stage-2 passes.

    Returns ``{"key", "source", "domain", "caption", "labels", "unparsed", "skipped", "features": {branch: {rep:
    [N, d]}}, "raw_dims": {branch: {rep: D}}[, "queries": {branch: [N, Q, H]}, "lm_input_ids",
    "lm_attention_mask"]}``."""
    from msmedcap.batch import DOMAINS

    device = model.device
    store: dict = {"key": [], "source": [], "domain": [], "caption": [], "labels": [], "unparsed": 0, "skipped": {}}
    feats = {b: {r: [] for r in REPRESENTATIONS} for b in model.branches}
    raw_dims = {b: {} for b in model.branches}
    queries = {b: [] for b in model.branches}
    ids, masks = [], []
    for batch in quota_batches(cfg, specs, batch_size, limit):
        for reason, n in (batch.get("skipped") or {}).items():
            store["skipped"][reason] = store["skipped"].get(reason, 0) + int(n)
        for b in model.branches:
            tokens = model.encode(batch, b)  # the model's own input path (uint8 pixels normalised there)
            qf = model.qformers[b]
            q = qf.queries(qf.image_embeds(tokens))
            proj = model.captioner.projections[b]
            p = proj(q.to(proj.weight.dtype))
            for rep, t in (("encoder", tokens), ("queries", q), ("prefix", p)):
                flat = t.detach().float().flatten(1).cpu()
                raw_dims[b][rep] = flat.shape[1]
                feats[b][rep].append(count_sketch(flat, max_dim) if flat.shape[1] > max_dim else flat)
            if keep_queries:
                queries[b].append(q.detach().cpu())
        domains = batch["domain"].tolist()
        for i, key in enumerate(batch["key"]):
            labels = sample_labels(batch["source"][i], batch["caption"][i])
            store["unparsed"] += labels is None
            store["key"].append(str(key))
            store["source"].append(str(batch["source"][i]))
            store["domain"].append(DOMAINS[domains[i]])
            store["caption"].append(batch["caption"][i])
            store["labels"].append(labels or {})
        if keep_queries:  # batches come padded to their own longest caption: to max_caption_len here
            width = cfg.model.lm.max_caption_len - batch["lm_input_ids"].shape[1]
            pad = model.captioner.tokenizer.pad_token_id or 0
            ids.append(F.pad(batch["lm_input_ids"], (0, width), value=pad))
            masks.append(F.pad(batch["lm_attention_mask"], (0, width), value=0))
    if not store["key"]:
        raise ValueError(f"no samples in {list(specs)}")
    store["features"] = {b: {r: torch.cat(v) for r, v in reps.items()} for b, reps in feats.items()}
    store["raw_dims"] = raw_dims
    if keep_queries:
        store["queries"] = {b: torch.cat(v) for b, v in queries.items()}
        store["lm_input_ids"], store["lm_attention_mask"] = torch.cat(ids), torch.cat(masks)
    return store


def run_probes(train: dict, test: dict, branches: Sequence[str], l2_grid: Sequence[float] = L2_GRID,
               max_iter: int = 100) -> dict:
    """{field: {"n_train", "n_test", "classes", "heads", "unseen_test_labels", "majority": {"label",
    "rate"}, "results": {branch: {rep: {"accuracy", "l2"[, "head_accuracy"]}}}}} for every field
    labelled in both the training and the test samples."""
    fields = field_order({f for labels in train["labels"] for f in labels} & {f for labels in test["labels"] for f in labels})
    out = {}
    for f in fields:
        itr = [i for i, lab in enumerate(train["labels"]) if f in lab]
        ite = [i for i, lab in enumerate(test["labels"]) if f in lab]
        ytr = [train["labels"][i][f] for i in itr]
        yte = [test["labels"][i][f] for i in ite]
        results = {}
        for b in branches:
            results[b] = {}
            for rep in REPRESENTATIONS:
                r = probe_accuracy(train["features"][b][rep][itr], ytr, test["features"][b][rep][ite], yte,
                                   l2_grid=l2_grid, max_iter=max_iter)
                results[b][rep] = {k: r[k] for k in ("accuracy", "l2", "head_accuracy") if k in r}
        out[f] = {"n_train": len(itr), "n_test": len(ite), "classes": len(set(ytr)),
                  "heads": len(encode_labels(ytr, [])[2]),
                  "unseen_test_labels": sum(y not in set(ytr) for y in yte),
                  "majority": majority(ytr, yte), "results": results}
    return out


# --------------------------------------------------------------------------- the LM's attention
@contextmanager
def eager_attention(lm):
    """The LM with eager attention (the implementation that returns attention weights), restored after."""
    before = lm.config._attn_implementation
    if before == "eager":
        yield lm
        return
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation("eager")
    else:
        lm.config._attn_implementation = "eager"
    try:
        yield lm
    finally:
        if hasattr(lm, "set_attn_implementation"):
            lm.set_attn_implementation(before)
        else:
            lm.config._attn_implementation = before


def segments(model, queries: dict) -> list:
    """[(name, start, end)] of the LM input before the caption, in order (captioner.prefix's order)."""
    cap = model.captioner
    out, pos = [], 0
    parts = [("soft_prompts", cap.soft_prompts.shape[0])]
    parts += [(f"{b}_queries", queries[b].shape[1]) for b in cap.projections]
    parts.append(("prompt", len(cap.prompt_ids)))
    for name, n in parts:
        out.append((name, pos, pos + n))
        pos += n
    return out


def _query_batch(store: dict, index: slice, device, replace: Optional[dict] = None) -> dict:
    replace = replace or {}
    out = {}
    for b, q in store["queries"].items():
        q = q[index]
        if b in replace:
            q = replace[b].expand(q.shape[0], -1, -1)
        out[b] = q.to(device)
    return out


def _forward(model, queries: dict, ids: torch.Tensor, mask: torch.Tensor, attentions: bool):
    cap = model.captioner
    prefix = cap.prefix(queries)
    embeds = torch.cat([prefix, cap.lm.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1)
    out = cap.lm(inputs_embeds=embeds, attention_mask=full_mask, logits_to_keep=ids.shape[1] + 1,
                 output_attentions=attentions)
    logits = out.logits[:, :-1].float()
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
    token_loss = token_loss.view(ids.shape) * mask
    return prefix.shape[1], token_loss, (out.attentions if attentions else None)


def _mean_rows(rows: list) -> Optional[list]:
    return torch.stack(rows).mean(0).tolist() if rows else None


@torch.no_grad()
def attention_shares(model, store: dict, batch_size: int = 64) -> dict:
    """Teacher-forced shares of attention mass per LM layer and prefix segment (see the module doc).

    Returns ``{"segments": [...], "lengths": {segment: positions}, "layers": [{segment: share}],
    "mean": {segment: share}, "per_position": [{segment: share / positions}], "domain": {d: {"n",
    "layers": [...]}}, "loss": caption loss (mean over tokens), "n"}``; each layer's shares sum to 1."""
    device = model.device
    n = len(store["key"])
    first = _query_batch(store, slice(0, 1), device)
    segs = segments(model, first)
    names = [s[0] for s in segs] + ["caption"]
    per_sample = []  # [N, layers, segments]
    loss_sum, tokens = 0.0, 0
    with eager_attention(model.captioner.lm):
        for start in range(0, n, batch_size):
            index = slice(start, min(start + batch_size, n))
            ids = store["lm_input_ids"][index].to(device)
            mask = store["lm_attention_mask"][index].to(device)
            k, token_loss, atts = _forward(model, _query_batch(store, index, device), ids, mask, attentions=True)
            loss_sum += float(token_loss.sum())
            tokens += int(mask.sum())
            t = k + ids.shape[1]
            onehot = torch.zeros(t, len(names), device=device)
            for j, (_, a, b) in enumerate(segs):
                onehot[a:b, j] = 1
            onehot[k:, len(names) - 1] = 1
            rows = mask.float()  # row k-1+i predicts caption token i
            layers = []
            for att in atts:
                a = att.float().mean(1)[:, k - 1: k - 1 + ids.shape[1]]  # [B, L, T]: heads averaged
                mass = a @ onehot  # [B, L, segments]
                layers.append((mass * rows[..., None]).sum(1) / rows.sum(1).clamp(min=1)[:, None])
            per_sample.append(torch.stack(layers, 1).cpu())
    shares = torch.cat(per_sample)  # [N, layers, segments]
    lengths = {name: b - a for name, a, b in segs}
    lengths["caption"] = int(store["lm_input_ids"].shape[1])

    def as_layers(x: torch.Tensor) -> list:
        return [dict(zip(names, row)) for row in x.mean(0).tolist()]

    layers = as_layers(shares)
    mean = dict(zip(names, shares.mean((0, 1)).tolist()))
    per_position = [{s: (v / lengths[s] if lengths[s] else None) for s, v in layer.items()} for layer in layers]
    domain = {}
    for d in sorted(set(store["domain"])):
        idx = [i for i, x in enumerate(store["domain"]) if x == d]
        domain[d] = {"n": len(idx), "layers": as_layers(shares[idx])}
    return {"segments": names, "lengths": lengths, "layers": layers, "mean": mean, "per_position": per_position,
            "domain": domain, "loss": loss_sum / max(tokens, 1), "n": n,
            "rows": "positions predicting caption tokens (last prompt token, caption tokens but the last), "
                    "heads averaged, then positions per sample, then samples"}


# --------------------------------------------------------------------------- leave one branch out
def _findings(records: list) -> dict:
    from msmedcap.eval.findings import score_findings

    block = score_findings(records)["overall"]
    return {"fields": {f: {"accuracy": v["accuracy"], "n": v["n"]} for f, v in block["fields"].items()},
            "distinct": block["distinct_predictions"]["share"]}


@torch.no_grad()
def ablations(model, cfg, store: dict, batch_size: int = 64) -> dict:
    """Caption loss (teacher-forced, mean over tokens) and findings of greedy captions with every
    branch, then with each branch's queries (and, with two branches, all of them) replaced by their
    mean over ``store``. Returns ``{"greedy": settings, "runs": {"none" | branch | "all": {"replaced",
    "loss", "fields": {field: {"accuracy", "n"}}, "distinct"[, "delta_loss", "delta_fields"]}}}``."""
    from msmedcap.eval.evaluate import generation_kwargs

    device = model.device
    n = len(store["key"])
    gen = {**generation_kwargs(cfg), "num_beams": 1}
    means = {b: q.float().mean(0, keepdim=True).to(q.dtype) for b, q in store["queries"].items()}
    branches = list(model.branches)
    plans = [("none", [])] + [(b, [b]) for b in branches] + ([("all", branches)] if len(branches) > 1 else [])
    runs = {}
    for name, replaced in plans:
        replace = {b: means[b] for b in replaced}
        loss_sum, tokens, captions = 0.0, 0, []
        for start in range(0, n, batch_size):
            index = slice(start, min(start + batch_size, n))
            queries = _query_batch(store, index, device, replace)
            ids = store["lm_input_ids"][index].to(device)
            mask = store["lm_attention_mask"][index].to(device)
            _, token_loss, _ = _forward(model, queries, ids, mask, attentions=False)
            loss_sum += float(token_loss.sum())
            tokens += int(mask.sum())
            captions += model.captioner.generate(queries, **gen)
        records = [{"key": k, "source": s, "domain": d, "references": [c], "prediction": p}
                   for k, s, d, c, p in zip(store["key"], store["source"], store["domain"], store["caption"], captions)]
        runs[name] = {"replaced": replaced, "loss": loss_sum / max(tokens, 1), **_findings(records),
                      "examples": [{"reference": r["references"][0], "prediction": r["prediction"]} for r in records[:3]]}
    base = runs["none"]
    for name, r in runs.items():
        if name == "none":
            continue
        r["delta_loss"] = r["loss"] - base["loss"]
        r["delta_fields"] = {f: (v["accuracy"] - base["fields"][f]["accuracy"]
                                 if v["accuracy"] is not None and base["fields"].get(f, {}).get("accuracy") is not None
                                 else None) for f, v in r["fields"].items()}
        r["delta_distinct"] = None if r["distinct"] is None or base["distinct"] is None else r["distinct"] - base["distinct"]
    return {"greedy": gen, "method": "each replaced branch's query outputs set to their mean over the eval samples",
            "runs": runs}


# --------------------------------------------------------------------------- the run's own captions
def caption_findings(path: Path, keys: Optional[set] = None) -> Optional[dict]:
    """Per-field accuracy of the captions in an evaluation's predictions.jsonl (their stored per-sample
    ``findings``, judged again where a line lacks them), restricted to ``keys`` where they overlap."""
    from msmedcap.eval.findings import judge_record, summarize
    from msmedcap.eval.io import read_predictions

    recs = read_predictions(path)
    if keys:
        mine = [r for r in recs if str(r["key"]) in keys]
        recs = mine or recs
    judged = [r["findings"] if isinstance(r.get("findings"), dict) and "parser" in r["findings"] else judge_record(r)
              for r in recs]
    block = summarize(judged, [r.get("prediction") for r in recs])
    return {"path": str(path), "n": block["n"],
            "fields": {f: {"accuracy": v["accuracy"], "n": v["n"]} for f, v in block["fields"].items()},
            "distinct": block["distinct_predictions"]["share"]}


def find_predictions(given: Path, export: Path) -> Optional[Path]:
    """The evaluation of this export: GIVEN/eval/predictions.jsonl, or, for a run's newest export
    (RUN/stageN/export), RUN/eval/predictions.jsonl."""
    from msmedcap.eval.checkpoints import CheckpointError, find_export

    candidates = [given / "eval" / "predictions.jsonl"]
    run = export.parent.parent
    try:
        if run != given and find_export(run) == export:
            candidates.append(run / "eval" / "predictions.jsonl")
    except CheckpointError:
        pass
    return next((c for c in candidates if c.is_file()), None)


# --------------------------------------------------------------------------- the job
def check_local_shards(key: str, specs: Sequence[str]) -> None:
    """Every local shard of ``specs`` exists (a missing one would only be counted as skipped)."""
    from msmedcap.data import shard_spec

    shard_spec.check_local_shards(key, list(specs), hint=f"; the probe trains on the run's training shards: pass "
                                  f"--set {key}=... where they are elsewhere")


def probe_run(run, out: Optional[str] = None, train_samples: int = 1200, eval_samples: int = 0,
              batch_size: int = 64, device: Optional[str] = None, overrides: Sequence[str] = (),
              num_workers: int = 0, max_dim: int = MAX_DIM) -> dict:
    """Probe a run directory or export; write OUT/probe.json (default RUN/probe) and return it.

    probe.json::

        run, export, variant, branches, out
        settings    {train_samples, eval_samples, batch_size, max_dim, l2_grid, device, frozen_dtype, train, eval}
        samples     {train: {n, domain: {d: n}, unparsed, skipped: {reason: n}}, eval: {...}}
        representations {branch: {encoder|queries|prefix: {dim, raw_dim, sketched}}}
        probes      {field: {n_train, n_test, classes, heads, unseen_test_labels, majority: {label, rate},
                             results: {branch: {rep: {accuracy, l2[, head_accuracy]}}}}}
        caption     {path, n, fields: {field: {accuracy, n}}, distinct} | null   (eval/predictions.jsonl)
        attention   {segments, lengths, layers: [{segment: share}], mean, per_position,
                     domain: {d: {n, layers}}, loss (eager pass), n, rows}
        ablation    {greedy, method, runs: {none|branch|all: {replaced, loss, fields, distinct,
                     delta_loss, delta_fields, delta_distinct, examples}}}
        time        {load_s, features_s, probes_s, attention_s, ablation_s, total_s}
    """
    from msmedcap.eval.checkpoints import find_export, is_export, load_for_eval, parse_eval_overrides
    from msmedcap.eval.io import write_json

    t0 = time.time()
    overrides = list(overrides)
    if num_workers is not None:
        overrides.append(f"data.num_workers={int(num_workers)}")
    parse_eval_overrides(overrides)
    given = Path(run)
    export = find_export(given)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_for_eval(export, overrides, device=dev)
    check_local_shards("data.train", cfg.data.train)
    out_dir = Path(out) if out else (export if is_export(given) or given.is_file() else given) / "probe"
    times = {"load_s": time.time() - t0}

    t = time.time()
    train = collect(model, cfg, cfg.data.train, limit=train_samples, batch_size=batch_size, max_dim=max_dim)
    test = collect(model, cfg, cfg.data.eval, limit=eval_samples, batch_size=batch_size, keep_queries=True,
                   max_dim=max_dim)
    times["features_s"] = time.time() - t
    t = time.time()
    probes = run_probes(train, test, model.branches)
    times["probes_s"] = time.time() - t
    t = time.time()
    attention = attention_shares(model, test, batch_size)
    times["attention_s"] = time.time() - t
    t = time.time()
    ablation = ablations(model, cfg, test, batch_size)
    times["ablation_s"] = time.time() - t
    preds = find_predictions(given if given.is_dir() else given.parent, export)
    caption = caption_findings(preds, set(test["key"])) if preds else None
    times["total_s"] = time.time() - t0

    def sample_counts(s):
        counts: dict = {}
        for d in s["domain"]:
            counts[d] = counts.get(d, 0) + 1
        return {"n": len(s["key"]), "domain": dict(sorted(counts.items())), "unparsed": s["unparsed"],
                "skipped": s["skipped"]}

    result = {
        "run": str(given), "export": str(export), "variant": cfg.model.variant, "branches": list(model.branches),
        "out": str(out_dir),
        "settings": {"train_samples": train_samples, "eval_samples": eval_samples, "batch_size": batch_size,
                     "max_dim": max_dim, "l2_grid": list(L2_GRID), "device": str(dev),
                     "frozen_dtype": str(model.captioner.lm.dtype).replace("torch.", ""),
                     "train": list(cfg.data.train), "eval": list(cfg.data.eval)},
        "samples": {"train": sample_counts(train), "eval": sample_counts(test)},
        "representations": {b: {r: {"dim": int(train["features"][b][r].shape[1]), "raw_dim": int(train["raw_dims"][b][r]),
                                    "sketched": train["raw_dims"][b][r] > max_dim} for r in REPRESENTATIONS}
                            for b in model.branches},
        "probes": probes, "caption": caption, "attention": attention, "ablation": ablation,
        "time": {k: round(v, 2) for k, v in times.items()},
    }
    write_json(out_dir / "probe.json", result)
    return result


# --------------------------------------------------------------------------- tables
def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _signed(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:+.{digits}f}"


def report_tables(result: dict) -> list:
    """[(title, headers, rows, caption)] of a probe.json: probes, attention per layer, ablation."""
    from msmedcap.eval.findings import field_header

    tables = []
    branches = result["branches"]
    caption = result.get("caption")
    greedy = result["ablation"]["runs"]["none"]
    heads = ["field", "train", "test", "classes", "majority"]
    heads += [f"{b} {r}" for b in branches for r in REPRESENTATIONS]
    heads += ["greedy caption"] + (["eval caption"] if caption else [])
    rows = []
    for f, p in result["probes"].items():
        row = [field_header(f), str(p["n_train"]), str(p["n_test"]), str(p["classes"]), _f(p["majority"]["rate"])]
        row += [_f(p["results"][b][r]["accuracy"]) for b in branches for r in REPRESENTATIONS]
        row.append(_f((greedy["fields"].get(f) or {}).get("accuracy")))
        if caption:
            row.append(_f((caption["fields"].get(f) or {}).get("accuracy")))
        rows.append(row)
    note = ("held-out accuracy of a logistic-regression probe per field (train: probe's training samples from "
            "data.train; test: data.eval); majority: the most frequent training label's share of the test "
            "samples; " + "; ".join(f"{r}: {REPRESENTATION_HELP[r]}" for r in REPRESENTATIONS)
            + "; greedy caption: this probe's greedy captions of the test samples")
    multi = [field_header(f) for f, p in result["probes"].items() if p.get("heads", 1) > 1]
    if multi:
        note += (f"; {', '.join(multi)}: one count head per item kind seen in training, right when all are "
                 "(classes: distinct values)")
    if caption:
        note += f"; eval caption: {caption['path']} (n={caption['n']})"
    tables.append((f"Linear probes · {result['variant']} · {result['export']}", heads, rows, note))

    att = result["attention"]
    segs = att["segments"]
    rows = [[str(i), *(_f(layer[s]) for s in segs)] for i, layer in enumerate(att["layers"])]
    rows.append(["mean", *(_f(att["mean"][s]) for s in segs)])
    rows.append(["positions", *(str(att["lengths"][s]) for s in segs)])
    for d, block in att["domain"].items():
        mean = {s: sum(layer[s] for layer in block["layers"]) / len(block["layers"]) for s in segs}
        rows.append([f"mean · {d} (n={block['n']})", *(_f(mean[s]) for s in segs)])
    tables.append(("Where the LM looks: share of attention mass from caption-predicting positions",
                   ["layer", *segs], rows,
                   f"teacher-forced on {att['n']} eval samples; {att['rows']}"))

    runs = result["ablation"]["runs"]
    labels = {name: "nothing" if name == "none" else "every branch" if name == "all" else f"{name} queries"
              for name in runs}
    heads = ["", *(labels[name] for name in runs)]

    def cell(r, value, delta, digits=3):
        return _f(value, digits) if delta is None or "delta_loss" not in r else f"{_f(value, digits)} ({_signed(delta, digits)})"

    rows = [["caption loss", *(cell(r, r["loss"], r.get("delta_loss"), 4) for r in runs.values())]]
    for f in greedy["fields"]:
        rows.append([field_header(f), *(cell(r, (r["fields"].get(f) or {}).get("accuracy"),
                                             (r.get("delta_fields") or {}).get(f)) for r in runs.values())])
    rows.append(["distinct", *(cell(r, r["distinct"], r.get("delta_distinct")) for r in runs.values())])
    tables.append(("Leave one branch out: which queries are replaced by their mean", heads, rows,
                   result["ablation"]["method"] + "; caption loss: teacher-forced, mean over caption tokens; "
                   "fields: findings accuracy of greedy captions; (change) against nothing replaced"))
    return tables


def markdown(result: dict) -> str:
    out = []
    for title, heads, rows, caption in report_tables(result):
        out.append(f"**{title}**\n")
        out.append("| " + " | ".join(heads) + " |")
        out.append("|---|" + "---:|" * (len(heads) - 1))
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append(f"\n*{caption}*\n")
    return "\n".join(out)


def print_report(result: dict, as_markdown: bool = False, console=None) -> None:
    from rich.table import Table

    from msmedcap.eval.report import make_console

    console = console or make_console()
    if as_markdown:  # no wrapping: Markdown rows must stay on one line
        console.print(markdown(result), markup=False, highlight=False, soft_wrap=True)
        return
    for title, heads, rows, caption in report_tables(result):
        table = Table(title=title, caption=caption)
        for i, h in enumerate(heads):
            table.add_column(h, justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
        for r in rows:
            table.add_row(*r)
        console.print(table)
    console.print(f"probe.json: {Path(result['out']) / 'probe.json'} · {result['time']['total_s']:.0f} s")
