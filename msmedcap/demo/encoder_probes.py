"""Probes of the demo's frozen encoders: what each one's tokens hold about every findings field
(logistic regression on flattened / mean-pooled tokens, :func:`run_probes`) and where in SAM's
embedding the lesion margin is kept (supervised readers, :func:`margin_probes`). Results:
docs/demo_encoders.md; run by ``msmedcap demo encoders probe|margin-probe``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msmedcap.data.decode import decode_image
from msmedcap.data.transforms import ClipTransform, SamTransform
from msmedcap.demo.encoders import DOMAINS, demo_model_config
from msmedcap.demo.world import SIZE, demo_sample


# --------------------------------------------------------------------------- probes
PROBE_FIELDS = ("background", "modality", "present", "side", "count", "size", "margin",
                "present (small)", "side (small)", "count (small)", "margin (small)")


def probe_labels(sample: dict) -> dict:
    """The findings a probe reads: general background; medical modality, lesion present, and where
    there are lesions side/count/size/margin; "(small)": the same among no-lesion and small-lesion
    scans (present) or small-lesion scans (the rest), the 2-px lesions CLIP's 32 px cannot resolve."""
    meta = sample["json"]
    if meta["domain"] == "general":
        return {"background": sample["txt"].rsplit(" on a ", 1)[1].split()[0]}
    out = {"modality": meta["modality"], "present": meta["lesions"] > 0}
    if meta["lesions"]:
        out.update(side=meta["side"], count=meta["lesions"], size=meta["size"], margin=meta["margin"])
    if meta["lesions"] == 0 or meta["size"] == "small":
        out["present (small)"] = meta["lesions"] > 0
    if meta["lesions"] and meta["size"] == "small":
        out.update({"side (small)": meta["side"], "count (small)": meta["lesions"], "margin (small)": meta["margin"]})
    return out


def logistic_probe(x_fit: torch.Tensor, y_fit: list, x_test: torch.Tensor, y_test: list,
                   l2s=(1e-4, 1e-3, 1e-2, 1e-1), seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features, its L2 weight
    chosen on a held-out fifth of the fit set, then refit on all of it (L-BFGS)."""
    classes = sorted(set(y_fit), key=str)
    index = {c: i for i, c in enumerate(classes)}
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    xf, xt = (x_fit - mean) / std, (x_test - mean) / std
    yf = torch.tensor([index[y] for y in y_fit])
    yt = torch.tensor([index.get(y, -1) for y in y_test])

    def fit(x, y, l2):
        w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return lambda z: (z @ w + b).argmax(1)

    order = torch.randperm(len(yf), generator=torch.Generator().manual_seed(seed))
    val, train = order[:len(order) // 5], order[len(order) // 5:]
    best = max(l2s, key=lambda l2: (fit(xf[train], yf[train], l2)(xf[val]) == yf[val]).float().mean().item())
    with torch.no_grad():
        return (fit(xf, yf, best)(xt) == yt).float().mean().item()


def sample_images(samples: list, transform) -> list:
    """Each generator sample's image, decoded and transformed as msmedcap's data code does."""
    return [transform(decode_image(s.get("png") or s["jpg"], SIZE * SIZE)) for s in samples]


def batched(fn, images: list, batch_size: int) -> torch.Tensor:
    """``fn`` over ``images`` in batches of ``batch_size``, concatenated, float32."""
    return torch.cat([fn(torch.stack(images[i:i + batch_size])).float() for i in range(0, len(images), batch_size)])


def probe_features(encoder, samples: list, transform, batch_size: int = 50) -> dict:
    """{"mean": pooled, "flat": flattened} frozen-encoder tokens of ``samples``' images. Mean-pooled:
    over CLIP's tokens; over SAM's positions (the channel vector) whatever its token layout."""
    from msmedcap.models.encoders import SamEncoder

    with torch.no_grad():
        tokens = batched(encoder, sample_images(samples, transform), batch_size)
    spatial_axis = 2 if isinstance(encoder, SamEncoder) and encoder.layout == "channels" else 1
    return {"mean": tokens.mean(spatial_axis), "flat": tokens.flatten(1)}


def probe_encoders(model_cfg=None) -> dict:
    """{column name: (branch, frozen encoder)}: random-init and pre-trained, CLIP and SAM (the
    preset's dims; random weights as msmedcap builds them without weights)."""
    import dataclasses

    from msmedcap.models.encoders import ClipEncoder, SamEncoder, fixed_seed

    m = model_cfg or demo_model_config()
    out = {}
    with fixed_seed():
        out["CLIP random"] = ("clip", ClipEncoder(dataclasses.replace(m.clip, pretrained=None)).freeze(torch.float32))
    out["CLIP pre-trained"] = ("clip", ClipEncoder(m.clip).freeze(torch.float32))
    with fixed_seed():
        out["SAM random"] = ("sam", SamEncoder(dataclasses.replace(m.sam, checkpoint=None)).freeze(torch.float32))
    out["SAM pre-trained"] = ("sam", SamEncoder(m.sam).freeze(torch.float32))
    return out


def run_probes(n_fit: int = 900, n_test: int = 450, seed: int = 0, model_cfg=None, encoders=None) -> dict:
    """{pooling: {field: {column: accuracy}}} plus "n" (test samples per field) and "chance" (the
    most frequent fit class on the test set). Fit on the generator's train split (the train shards'
    images), test on its eval split (indices 0-149 are the eval shards)."""
    m = model_cfg or demo_model_config()
    encoders = encoders or probe_encoders(m)
    transforms = {"clip": ClipTransform(m.clip.image_size), "sam": SamTransform(m.sam.image_size)}
    data = {split: [demo_sample(seed, split, d, i) for d in DOMAINS for i in range(n)]
            for split, n in (("train", n_fit), ("eval", n_test))}
    labels = {split: [probe_labels(s) for s in samples] for split, samples in data.items()}
    result = {"mean": {}, "flat": {}, "n": {}, "chance": {}}
    feats = {name: {split: probe_features(enc, data[split], transforms[branch]) for split in data}
             for name, (branch, enc) in encoders.items()}
    for field in PROBE_FIELDS:
        fit = [i for i, lab in enumerate(labels["train"]) if field in lab]
        test = [i for i, lab in enumerate(labels["eval"]) if field in lab]
        y_fit = [labels["train"][i][field] for i in fit]
        y_test = [labels["eval"][i][field] for i in test]
        majority = max(set(y_fit), key=y_fit.count)
        result["n"][field] = len(test)
        result["chance"][field] = sum(y == majority for y in y_test) / len(y_test)
        for pooling in ("mean", "flat"):
            result[pooling][field] = {
                name: logistic_probe(f["train"][pooling][fit], y_fit, f["eval"][pooling][test], y_test, seed=seed)
                for name, f in feats.items()}
    return result


class PositionReader(torch.nn.Module):
    """A supervised reader of SAM embeddings ``[N, C, g, g]``: a per-position map (1 x 1 convolutions:
    ``linear`` or a 2-layer ``mlp``) or a local one (``conv``: two 3 x 3 convolutions), pooled over the
    positions (``max`` or ``mean``), then a linear layer."""

    def __init__(self, channels: int, classes: int, kind: str, pool: str):
        super().__init__()
        act = torch.nn.ReLU
        self.body = {
            "linear": lambda: torch.nn.Conv2d(channels, 64, 1),
            "mlp": lambda: torch.nn.Sequential(torch.nn.Conv2d(channels, 64, 1), act(), torch.nn.Conv2d(64, 64, 1), act()),
            "conv": lambda: torch.nn.Sequential(torch.nn.Conv2d(channels, 64, 3, padding=1), act(),
                                                torch.nn.Conv2d(64, 64, 3, padding=1), act()),
        }[kind]()
        self.pool = torch.nn.AdaptiveMaxPool2d(1) if pool == "max" else torch.nn.AdaptiveAvgPool2d(1)
        self.out = torch.nn.Linear(64, classes)

    def forward(self, x):
        return self.out(self.pool(self.body(x)).flatten(1))


class QFormerReader(torch.nn.Module):
    """A fresh demo Q-Former (``qformer_cfg``, with a token adapter when ``token_mlp``) on the embedding as
    per-position tokens (``spatial``), a linear layer on the mean of its query outputs: the queries' own
    route to the labels."""

    def __init__(self, channels: int, classes: int, qformer_cfg, token_mlp: int = 0):
        super().__init__()
        from msmedcap.models.qformer import QFormer

        self.qformer = QFormer(qformer_cfg, channels, vocab_size=8, pad_token_id=0, token_mlp=token_mlp)
        self.out = torch.nn.Linear(qformer_cfg.hidden_size, classes)

    def forward(self, x):
        q = self.qformer
        return self.out(q.queries(q.image_embeds(x.flatten(2).transpose(1, 2))).mean(1))


def supervised_probe(x_fit: torch.Tensor, y_fit: list, x_test: torch.Tensor, y_test: list, reader: str = "conv-max",
                     steps: int = 1500, seed: int = 0, qformer_cfg=None, token_mlp: int = 0) -> tuple:
    """A reader trained on the labels (AdamW 2e-3, batch 64; ``reader``: ``{linear,mlp,conv}-{max,mean}``
    (:class:`PositionReader`) or ``qformer`` (:class:`QFormerReader`, AdamW 1e-3, batch 32)) on SAM
    embeddings ``[N, C, g, g]`` -> (fit accuracy on 500, test predictions right [bool per sample])."""
    classes = sorted(set(y_fit), key=str)
    yf = torch.tensor([classes.index(y) for y in y_fit])
    yt = torch.tensor([classes.index(y) if y in classes else -1 for y in y_test])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if reader == "qformer":
            head, lr, batch = QFormerReader(x_fit.shape[1], len(classes), qformer_cfg, token_mlp), 1e-3, 32
        else:
            head, lr, batch = PositionReader(x_fit.shape[1], len(classes), *reader.split("-")), 2e-3, 64
    opt = torch.optim.AdamW(head.parameters(), lr, weight_decay=0.01)
    for _ in range(steps):
        idx = torch.randint(0, len(yf), (batch,), generator=gen)
        loss = F.cross_entropy(head(x_fit[idx]), yf[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        fit_acc = (head(x_fit[:500]).argmax(1) == yf[:500]).float().mean().item()
        return fit_acc, (head(x_test).argmax(1) == yt)


# Readers of margin_probes, in table order: (row name, SAM weights, reader, Q-Former cross_attention_init,
# Q-Former token_mlp)
MARGIN_READERS = (
    ("conv 3x3, max", "random", "conv-max", None, 0),
    ("conv 3x3, max", "pre-trained", "conv-max", None, 0),
    ("per position linear, max", "pre-trained", "linear-max", None, 0),
    ("per position linear, mean (what uniform attention computes)", "pre-trained", "linear-mean", None, 0),
    ("per position MLP, max", "pre-trained", "mlp-max", None, 0),
    ("per position MLP, mean", "pre-trained", "mlp-mean", None, 0),
    ("Q-Former, cross-attention init 0.02 (BERT's)", "pre-trained", "qformer", 0.02, 0),
    ("Q-Former, cross-attention init 0.2 (the demo's)", "pre-trained", "qformer", 0.2, 0),
    ("Q-Former, init 0.2, token adapter (token_mlp 4, the demo's SAM branch)", "pre-trained", "qformer", 0.2, 4),
)


def margin_probes(n_fit: int = 2000, n_test: int = 400, seed: int = 0, model_cfg=None, readers=MARGIN_READERS,
                  steps: int = 1500) -> dict:
    """Margin (smooth / irregular) read from the frozen SAM image embedding ``[C, 16, 16]`` (random and
    pre-trained) by readers trained on the labels (:func:`supervised_probe`), fit on ``n_fit`` lesion
    scans of the train split, tested on ``n_test`` of the eval split:
    {(row, weights): {"fit", "all", "small", "large"}} plus "n"."""
    from msmedcap.models.encoders import SamEncoder, fixed_seed
    import dataclasses

    m = model_cfg or demo_model_config()
    transform = SamTransform(m.sam.image_size)

    def lesion_scans(split, n):
        out, i = [], 0
        while len(out) < n:
            s = demo_sample(seed, split, "medical", i)
            i += 1
            if s["json"]["lesions"]:
                out.append(s)
        return out
    data = {"fit": lesion_scans("train", n_fit), "test": lesion_scans("eval", n_test)}
    def encoder(weights):  # only the ones the readers use
        if weights == "pre-trained":
            return SamEncoder(m.sam).freeze(torch.float32)
        with fixed_seed():
            return SamEncoder(dataclasses.replace(m.sam, checkpoint=None)).freeze(torch.float32)
    emb = {}
    for weights in sorted({r[1] for r in readers}):
        enc = encoder(weights)
        for split, samples in data.items():
            with torch.no_grad():  # the image encoder's own output [N, C, g, g] (before msmedcap's token layout)
                emb[weights, split] = batched(enc.encoder, sample_images(samples, transform), 100)
    margins = {split: [s["json"]["margin"] for s in samples] for split, samples in data.items()}
    small = torch.tensor([s["json"]["size"] == "small" for s in data["test"]])
    result = {"n": {"fit": n_fit, "test": n_test}}
    for row, weights, reader, init, token_mlp in readers:
        qformer_cfg = dataclasses.replace(m.qformer, cross_attention_init=init) if reader == "qformer" else None
        fit_acc, right = supervised_probe(emb[weights, "fit"], margins["fit"], emb[weights, "test"], margins["test"],
                                          reader=reader, steps=steps, seed=seed, qformer_cfg=qformer_cfg,
                                          token_mlp=token_mlp)
        result[row, weights] = {"fit": fit_acc, "all": right.float().mean().item(),
                                "small": right[small].float().mean().item(), "large": right[~small].float().mean().item()}
    return result


def probe_table(result: dict, pooling: str) -> str:
    columns = list(next(iter(result[pooling].values())))
    lines = ["| field | n | chance | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for field, row in result[pooling].items():
        lines.append(f"| {field} | {result['n'][field]} | {result['chance'][field]:.2f} | "
                     + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


