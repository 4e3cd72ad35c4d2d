"""Stage-1 losses of one Q-Former as BLIP-2 defines them: ITC, ITM with hard negatives, ITG.

Distributed: ITC features, ITM image embeddings and text ids are gathered across ranks (with gradient
where BLIP-2 has it). Each rank holds ``B`` rows (its micro batch) of which only the routed ones are
real; the others are padding, marked invalid, so every rank takes part in every collective even when
none of its samples go to this branch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from msmedcap.models.qformer import QFormer

LABEL_SMOOTHING = 0.1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def rank() -> int:
    return dist.get_rank() if _distributed() else 0


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if x.shape[0] < rows else x


def gather_rows(x: torch.Tensor, rows: int, with_grad: bool) -> torch.Tensor:
    """``x`` (``n <= rows`` rows here) from all ranks, each padded to ``rows``; ``x`` itself on one process."""
    return gather(pad_rows(x, rows), with_grad) if _distributed() else x


def itc_logits(image_feats: torch.Tensor, text_feat: torch.Tensor, image_all: torch.Tensor,
               text_all: torch.Tensor, temp: torch.Tensor):
    """Image->text and text->image similarities ``[n, m]``: the max over queries of the query-text
    cosine, / temp. ``image_feats [n,Q,D]``, ``text_feat [n,D]`` local; ``*_all`` gathered, valid rows."""
    sim_i2t = torch.einsum("nqd,md->nmq", image_feats, text_all).amax(-1) / temp
    sim_t2i = torch.einsum("nd,mqd->nmq", text_feat, image_all).amax(-1) / temp
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(sim_i2t.float(), targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=LABEL_SMOOTHING)) / 2


def sample_negatives(sim: torch.Tensor, targets: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row, one column drawn with probability softmax(sim), never the row's own positive."""
    with torch.no_grad():
        weights = sim.float().softmax(dim=1)
        weights[torch.arange(len(targets)), targets] = 0
        weights += 1e-12 * (weights.sum(1, keepdim=True) == 0)  # a single sample: it is its own negative
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_inputs(image_embeds_all, text_ids_all, text_mask_all, image_embeds, text_ids, text_mask,
               sim_i2t, sim_t2i, targets, generator=None):
    """BLIP-2's ITM triples: (image, its text) positive; (image, mined text) and (mined image, text)
    negatives. Returns the image embeds, text ids/mask for 3n pairs and their labels."""
    neg_img = sample_negatives(sim_t2i, targets, generator)  # a hard negative image per text
    neg_txt = sample_negatives(sim_i2t, targets, generator)  # a hard negative text per image
    images = torch.cat([image_embeds, image_embeds_all[neg_img], image_embeds])
    ids = torch.cat([text_ids, text_ids, text_ids_all[neg_txt]])
    mask = torch.cat([text_mask, text_mask, text_mask_all[neg_txt]])
    n = text_ids.shape[0]
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(ids.device)
    return images, ids, mask, labels


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token loss over the caption after the [DEC] bos; padding ignored; label smoothing 0.1."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=LABEL_SMOOTHING)


def stage1_branch_loss(qformer: QFormer, encoder_tokens: torch.Tensor, text_ids: torch.Tensor,
                       text_mask: torch.Tensor, rows: int, dec_token_id: int, generator=None) -> dict:
    """ITC + ITM + ITG of one Q-Former on its ``n <= rows`` routed samples (``n`` may be 0 on this
    rank). ``rows`` is the micro batch size, equal on all ranks. Returns scalar tensors."""
    n = text_ids.shape[0]
    with torch.no_grad():
        qformer.temp.clamp_(0.001, 0.5)
    image_embeds = qformer.image_embeds(encoder_tokens)
    if n:
        query_out, query_kv = qformer.queries_with_kv(image_embeds)  # the keys/values serve ITG below
        image_feats = F.normalize(qformer.vision_proj(query_out), dim=-1)
        text_out = qformer.text(text_ids, text_mask)
        text_feat = F.normalize(qformer.text_proj(text_out[:, 0]), dim=-1)
    else:  # nothing routed here: empty rows that still reach every parameter, so backward stays in step
        touch = 0.0 * sum(p.sum() for p in qformer.parameters() if p.requires_grad)
        image_feats = image_embeds.new_zeros(0, qformer.num_queries, qformer.vision_proj.out_features) + touch
        text_feat = image_embeds.new_zeros(0, qformer.text_proj.out_features) + touch
        image_embeds = image_embeds + touch

    # ---- gather (every rank, same shapes): features with gradient, ids and masks without
    image_all = gather_rows(image_feats, rows, with_grad=True)
    text_all = gather_rows(text_feat, rows, with_grad=True)
    embeds_all = gather_rows(image_embeds, rows, with_grad=True)
    valid_all = gather_rows(torch.ones(n, dtype=torch.bool, device=text_ids.device), rows, with_grad=False)
    ids_all = gather_rows(text_ids, rows, with_grad=False)
    mask_all = gather_rows(text_mask, rows, with_grad=False)
    # every rank's loss depends on the gathered tensors: all ranks run the gathers' backward
    anchor = 0.0 * (image_all.sum() + text_all.sum() + embeds_all.sum())
    if n == 0:
        return {"itc": anchor, "itm": anchor.detach(), "itg": anchor.detach()}

    # padding rows dropped: columns = the valid samples of all ranks, in rank order
    keep = valid_all.nonzero().squeeze(1)
    image_all, text_all, embeds_all, ids_all, mask_all = (
        t[keep] for t in (image_all, text_all, embeds_all, ids_all, mask_all))
    targets = valid_all[: rank() * rows].sum() + torch.arange(n, device=text_ids.device)
    sim_i2t, sim_t2i = itc_logits(image_feats, text_feat, image_all, text_all, qformer.temp)
    loss_itc = itc_loss(sim_i2t, sim_t2i, targets)

    images, ids, mask, labels = itm_inputs(embeds_all, ids_all, mask_all, image_embeds, text_ids, text_mask,
                                           sim_i2t, sim_t2i, targets, generator)
    vl = qformer.multimodal(ids, mask, images)
    loss_itm = F.cross_entropy(qformer.itm_head(vl).float().mean(dim=1), labels)

    dec_ids = text_ids.clone()
    dec_ids[:, 0] = dec_token_id  # [DEC] replaces [CLS]
    loss_itg = itg_loss(qformer.decode(dec_ids, text_mask, query_kv=query_kv), dec_ids, text_mask)
    return {"itc": loss_itc + anchor, "itm": loss_itm, "itg": loss_itg}
