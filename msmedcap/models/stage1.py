"""Stage-1 losses of one Q-Former as BLIP-2 defines them: ITC, ITM with hard negatives, ITG.

Distributed: ITC features and text ids are gathered across ranks (the features with gradient); ITM
fetches from their owner ranks only the image embeddings it draws as hard negatives (with gradient back
to the owner, where the embeddings have one). Each rank holds ``B`` rows (its micro batch) of which only
the routed ones are real; the others are padding, marked invalid, so every rank takes part in every
collective even when none of its samples go to this branch. Every gathered tensor has the same
``requires_grad`` on every rank (decided by the parameters, never by the routing), so all ranks run the
same backward collectives.

Text length: the loader pads each micro batch to its longest caption; each branch pads (or trims pad
columns) to the longest routed caption over all ranks, rounded up to a multiple of 8
(:func:`text_length`), so every rank gathers equal shapes and one process gives what many do. The ITG
head and its loss run on the label-bearing positions only.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from msmedcap.models.qformer import QFormer

LABEL_SMOOTHING = 0.1
TEMP_BOUNDS = (0.001, 0.5)  # BLIP-2's clamp of the ITC temperature
TEXT_MULTIPLE = 8  # stage-1 text lengths are rounded up to this


_RANK_LOCAL = [False]


@contextmanager
def rank_local():
    """The losses of this rank's batch alone, with no collective (validation: the ranks hold uneven shares
    of the held-out set, so they do not run the same number of forwards)."""
    _RANK_LOCAL[0] = True
    try:
        yield
    finally:
        _RANK_LOCAL[0] = False


def _distributed() -> bool:
    return not _RANK_LOCAL[0] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (identity on one process)."""
    if not _distributed():
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def touch(tensors) -> torch.Tensor:
    """A zero that depends on every tensor of ``tensors`` (each gets a zero gradient), in fp32 and from one
    element of each: ``0 * x.sum()`` of a whole fp16/bf16 tensor can overflow to inf, and 0 * inf is NaN."""
    return sum(t.reshape(-1)[:1].float().sum() for t in tensors) * 0.0


class _Bounded(torch.autograd.Function):
    """``x.clamp(lo, hi)`` whose gradient also passes where ``x`` is outside the bounds and the gradient
    points back inside (a descent step moves ``x`` towards them): a parameter past a bound (e.g. the
    optimizer's fp32 master, which an in-place clamp of the module copy never reaches) is not stuck in
    clamp's zero-gradient zone, as BLIP-2's in-place clamp never leaves it there."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward(x)
        ctx.bounds = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,), (lo, hi) = ctx.saved_tensors, ctx.bounds
        passes = ((x >= lo) & (x <= hi)) | ((x > hi) & (grad > 0)) | ((x < lo) & (grad < 0))
        return grad * passes, None, None


def bounded_temp(temp: torch.Tensor) -> torch.Tensor:
    """The ITC temperature in fp32, clamped to :data:`TEMP_BOUNDS` in the forward (the parameter itself
    is never modified; see :class:`_Bounded`)."""
    return _Bounded.apply(temp.float(), *TEMP_BOUNDS)


def text_length(mask: torch.Tensor, cap: int) -> int:
    """The text length every rank pads to: the longest caption (last non-pad column of ``mask``) over all
    ranks, rounded up to a multiple of :data:`TEXT_MULTIPLE`, at most ``cap`` (``model.qformer.max_text_len``)
    unless a caption is longer. One all-reduce (MAX) when distributed; ``mask`` may have 0 rows."""
    columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    longest = (mask.bool().any(0) * columns).amax(0, keepdim=True) if mask.shape[1] else columns.new_zeros(1)
    if _distributed():
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    longest = int(longest)
    return max(longest, min(-(-max(longest, 1) // TEXT_MULTIPLE) * TEXT_MULTIPLE, cap))


def fit_text(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple:
    """``ids``/``mask`` with ``length`` columns: pad columns dropped, or padding (``pad_id``, mask 0) added."""
    width = ids.shape[1]
    if width >= length:
        return ids[:, :length], mask[:, :length]
    return F.pad(ids, (0, length - width), value=pad_id), F.pad(mask, (0, length - width), value=0)


def fetch_rows(x: torch.Tensor, want: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` of all ranks (each ``rows`` rows, of which this rank's ``x`` holds the first ``n``) at the
    global row indices ``want`` (rank-major: row ``i`` of rank ``r`` is ``r * rows + i``): only the rows
    asked for cross ranks, each from its owner (one all-gather of the indices, one all-to-all of the rows),
    with gradient back to the owner when ``x`` requires grad, which must then hold on every rank.
    ``x[want]`` on one process."""
    if not _distributed():
        return x[want]
    world, me = dist.get_world_size(), dist.get_rank()
    asked = gather(F.pad(want, (0, rows - want.shape[0]), value=-1), with_grad=False).view(world, rows)
    mine = (asked >= 0) & (asked // rows == me)  # [requester, request]: asks for a row of this rank
    send_counts = mine.sum(1).tolist()
    send = x[(asked % rows)[mine]].contiguous()  # requester by requester; x may be a transposed layout
    owner = want // rows
    recv_counts = torch.bincount(owner, minlength=world).tolist()
    out = x.new_empty(want.shape[0], *x.shape[1:])
    if x.requires_grad:
        from torch.distributed.nn.functional import all_to_all_single

        out = all_to_all_single(out, send, recv_counts, send_counts)
    else:
        dist.all_to_all_single(out, send, recv_counts, send_counts)
    order = torch.argsort(owner, stable=True)  # ``out`` holds ``want[order]``: owner by owner
    return out[torch.argsort(order)]


def _grad_as(x: torch.Tensor, grad: bool, zero: torch.Tensor) -> torch.Tensor:
    """``x`` with ``requires_grad == grad`` (a gradient path through ``zero`` added where it has none)."""
    if not grad:
        return x.detach()
    return x if x.requires_grad else x + zero


def rank() -> int:
    return dist.get_rank() if _distributed() else 0


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if x.shape[0] < rows else x


def gather_rows(x: torch.Tensor, rows: int, with_grad: bool) -> torch.Tensor:
    """``x`` (``n <= rows`` rows here) from all ranks, each padded to ``rows``; ``x`` itself on one process."""
    return gather(pad_rows(x, rows), with_grad) if _distributed() else x


def itc_logits(image_feats: torch.Tensor, text_feat: torch.Tensor, image_all: torch.Tensor,
               text_all: torch.Tensor, temp: torch.Tensor):
    """Image->text and text->image similarities ``[n, m]`` in fp32: the max over queries of the query-text
    cosine, / temp. ``image_feats [n,Q,D]``, ``text_feat [n,D]`` local; ``*_all`` gathered, valid rows."""
    temp = temp.float()
    sim_i2t = torch.einsum("nqd,md->nmq", image_feats.float(), text_all.float()).amax(-1) / temp
    sim_t2i = torch.einsum("nd,mqd->nmq", text_feat.float(), image_all.float()).amax(-1) / temp
    return sim_i2t, sim_t2i


def pair_similarity(image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """Image ``i`` against text ``i`` only: the max over queries of the query-text cosine, in fp32 ``[n]``
    (the diagonal of :func:`itc_logits` before the temperature)."""
    return torch.einsum("nqd,nd->nq", image_feats.float(), text_feat.float()).amax(-1)


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(sim_i2t.float(), targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=LABEL_SMOOTHING)) / 2


def sample_negatives(sim: torch.Tensor, targets: torch.Tensor, generator=None, skip=None) -> torch.Tensor:
    """For each row, one column drawn with probability softmax(sim), never the row's own positive (nor,
    where ``skip`` [rows, columns] is given, a column it marks)."""
    with torch.no_grad():
        weights = sim.float().softmax(dim=1)
        if skip is not None:
            weights = weights.masked_fill(skip, 0)
        weights[torch.arange(len(targets)), targets] = 0
        weights += 1e-12 * (weights.sum(1, keepdim=True) == 0)  # a single sample: it is its own negative
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_pairs(neg_images, text_ids_all, text_mask_all, image_embeds, text_ids, text_mask, neg_txt):
    """BLIP-2's ITM triples from drawn negatives: (image, its text) positive; (image, mined text) and
    (mined image ``neg_images``, text) negatives. Returns the image embeds, text ids/mask for 3n pairs and
    their labels."""
    images = torch.cat([image_embeds, neg_images, image_embeds])
    ids = torch.cat([text_ids, text_ids, text_ids_all[neg_txt]])
    mask = torch.cat([text_mask, text_mask, text_mask_all[neg_txt]])
    n = text_ids.shape[0]
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(ids.device)
    return images, ids, mask, labels


def itm_inputs(image_embeds_all, text_ids_all, text_mask_all, image_embeds, text_ids, text_mask,
               sim_i2t, sim_t2i, targets, generator=None):
    """:func:`itm_pairs` with the negatives drawn here (a hard negative image per text, then a text per
    image) from all ranks' ``image_embeds_all``."""
    neg_img = sample_negatives(sim_t2i, targets, generator)
    neg_txt = sample_negatives(sim_i2t, targets, generator)
    return itm_pairs(image_embeds_all[neg_img], text_ids_all, text_mask_all, image_embeds, text_ids, text_mask,
                     neg_txt)


def itg_loss(qformer: QFormer, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_kv) -> torch.Tensor:
    """Next-token loss over the caption after the [DEC] bos; label smoothing 0.1. The vocabulary-sized
    head and the CE run only on the positions that predict a real token (padding never had a label)."""
    labelled = attention_mask[:, 1:].bool()
    positions = F.pad(labelled, (0, 1), value=False)  # position t predicts token t + 1
    logits = qformer.decode(input_ids, attention_mask, query_kv=query_kv, positions=positions)
    return F.cross_entropy(logits.float(), input_ids[:, 1:][labelled], label_smoothing=LABEL_SMOOTHING)


def stage1_branch_loss(qformer: QFormer, encoder_tokens: torch.Tensor, text_ids: torch.Tensor,
                       text_mask: torch.Tensor, rows: int, dec_token_id: int, generator=None,
                       max_text_len: int = 512, counterfactuals=None, skip_same_text: bool = False) -> dict:
    """ITC + ITM + ITG of one Q-Former on its ``n <= rows`` routed samples (``n`` may be 0 on this
    rank). ``rows`` is the micro batch size, equal on all ranks; the text is padded to
    :func:`text_length` (``max_text_len``: ``model.qformer.max_text_len``). ``counterfactuals``: these
    samples' :class:`~msmedcap.models.counterfactuals.CounterfactualTexts` (model.stage1.counterfactuals);
    ``skip_same_text``: mined negatives skip samples with the positive's caption. Returns scalar tensors:
    the three losses, and ``n_cf`` (counterfactual negatives used) when counterfactuals are given."""
    n = text_ids.shape[0]
    pad_id = qformer.embeddings.word_embeddings.padding_idx or 0
    cf = counterfactuals
    masks = text_mask
    if cf is not None:  # one length for both, so a counterfactual is never cut shorter than its positive
        width = max(text_mask.shape[1], cf.mask.shape[1])
        masks = torch.cat([fit_text(ids, mask, width, pad_id)[1]
                           for ids, mask in ((text_ids, text_mask), (cf.ids, cf.mask))])
    length = text_length(masks, max_text_len)
    text_ids, text_mask = fit_text(text_ids, text_mask, length, pad_id)
    if cf is not None:
        cf = replace(cf, **dict(zip(("ids", "mask"), fit_text(cf.ids, cf.mask, length, pad_id))))
    # requires_grad of everything gathered: from the parameters (and grad mode), the same on every rank
    trained = [p for p in qformer.parameters() if p.requires_grad]
    grad = torch.is_grad_enabled() and bool(trained)
    embeds_grad = grad and qformer.image_embeds_trained()
    zero = touch(trained)
    image_embeds = _grad_as(qformer.image_embeds(encoder_tokens), embeds_grad, zero)
    if n:
        query_out, query_kv = qformer.queries_with_kv(image_embeds)  # the keys/values serve ITG below
        image_feats = F.normalize(qformer.vision_proj(query_out), dim=-1)
        text_out = qformer.text(text_ids, text_mask)
        text_feat = F.normalize(qformer.text_proj(text_out[:, 0]), dim=-1)
    else:  # nothing routed here: empty rows that still reach every parameter, so backward stays in step
        image_feats = image_embeds.new_zeros(0, qformer.num_queries, qformer.vision_proj.out_features)
        text_feat = image_embeds.new_zeros(0, qformer.text_proj.out_features)
    image_feats, text_feat = _grad_as(image_feats, grad, zero), _grad_as(text_feat, grad, zero)

    # ---- gather (every rank, same shapes): features with gradient, ids and masks without
    image_all = gather_rows(image_feats, rows, with_grad=grad)
    text_all = gather_rows(text_feat, rows, with_grad=grad)
    valid_all = gather_rows(torch.ones(n, dtype=torch.bool, device=text_ids.device), rows, with_grad=False)
    ids_all = gather_rows(text_ids, rows, with_grad=False)
    mask_all = gather_rows(text_mask, rows, with_grad=False)
    # padding rows dropped: columns = the valid samples of all ranks, in rank order
    keep = valid_all.nonzero().squeeze(1)
    if n:
        image_all, text_all, ids_all, mask_all = (t[keep] for t in (image_all, text_all, ids_all, mask_all))
        targets = valid_all[: rank() * rows].sum() + torch.arange(n, device=text_ids.device)
        sim_i2t, sim_t2i = itc_logits(image_feats, text_feat, image_all, text_all, bounded_temp(qformer.temp))
        if cf is not None and cf.itc:
            loss_itc = _itc_loss_with_counterfactuals(qformer, image_feats, sim_i2t, sim_t2i, targets, cf)
        else:
            loss_itc = itc_loss(sim_i2t, sim_t2i, targets)
        same = (text_ids[:, None, :] == ids_all[None]).all(-1) if skip_same_text else None  # [n, columns]
        neg_img = sample_negatives(sim_t2i, targets, generator, same)  # a hard negative image per text
        neg_txt = sample_negatives(sim_i2t, targets, generator, same)  # a hard negative text per image
        want = keep[neg_img]  # global rows (rank-major, padding rows counted)
    else:
        want = keep.new_zeros(0)
    # every rank takes part in the fetch, and in its backward (the anchor below) when it has gradient
    neg_images = fetch_rows(image_embeds, want, rows)
    # every rank's loss depends on the gathered tensors: all ranks run the gathers' backward
    anchor = touch([image_all, text_all, neg_images])
    if n == 0:
        out = {"itc": anchor, "itm": anchor.detach(), "itg": anchor.detach()}
        return out if cf is None else {**out, **cf.counts(torch.zeros(0, dtype=torch.bool, device=anchor.device))}

    images, ids, mask, labels = itm_pairs(neg_images, ids_all, mask_all, image_embeds, text_ids, text_mask, neg_txt)
    counts = {}
    if cf is not None:  # a share of the (image, other text) negatives: the image's own counterfactual instead
        use = cf.valid & (torch.rand(n, generator=generator, device=cf.valid.device) < cf.itm_share)
        rows = 2 * n + use.nonzero().squeeze(1)
        ids, mask = ids.index_put((rows,), cf.ids[use]), mask.index_put((rows,), cf.mask[use])
        counts = cf.counts(use)
    vl = qformer.multimodal(ids, mask, images)
    loss_itm = F.cross_entropy(qformer.itm_head(vl).float().mean(dim=1), labels)

    dec_ids = text_ids.clone()
    dec_ids[:, 0] = dec_token_id  # [DEC] replaces [CLS]
    loss_itg = itg_loss(qformer, dec_ids, text_mask, query_kv)
    return {"itc": loss_itc + anchor, "itm": loss_itm, "itg": loss_itg, **counts}


def _itc_loss_with_counterfactuals(qformer, image_feats, sim_i2t, sim_t2i, targets, cf) -> torch.Tensor:
    """:func:`itc_loss` where each image with a counterfactual also scores it, one extra text column
    (rows without one keep the usual columns)."""
    feat = F.normalize(qformer.text_proj(qformer.text(cf.ids, cf.mask)[:, 0]), dim=-1)
    sim_cf = pair_similarity(image_feats, feat) / bounded_temp(qformer.temp)
    plain = F.cross_entropy(sim_i2t.float(), targets, label_smoothing=LABEL_SMOOTHING, reduction="none")
    extended = F.cross_entropy(torch.cat([sim_i2t.float(), sim_cf[:, None]], 1), targets,
                               label_smoothing=LABEL_SMOOTHING, reduction="none")
    i2t = torch.where(cf.valid, extended, plain).mean()
    return (i2t + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=LABEL_SMOOTHING)) / 2
