"""ITG reuses the query pass's keys/values (issue 11, item 5) and equals the former full pass.

The reference below is the implementation before the change, kept here: ITG as one more pass of
queries + text through transformers' ``Blip2QFormerModel`` under the ITG mask (queries cross-attend
again). LAVIS's ``blip2_qformer.py`` does what the new code does: its ITG call gets the query pass's
``past_key_values``. Dropout is off (eval mode): with dropout the two differ only in which dropout
masks the queries get (the new code, as LAVIS, keeps the query pass's).
"""
import pytest
import torch
from helpers.model_kit import CAPTIONS, demo_config, make_batch, one_thread

from msmedcap.models import build_model
from msmedcap.models.qformer import QFormer

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def reference_decode(qformer: QFormer, input_ids, attention_mask, image_embeds) -> torch.Tensor:
    """ITG logits as computed before: [queries; text] through the whole Q-Former, ITG mask."""
    q = qformer.query_tokens.expand(input_ids.shape[0], -1, -1)
    emb = qformer.embeddings(input_ids=input_ids, query_embeds=q)
    mask = qformer.itg_mask(attention_mask, emb.dtype)
    out = qformer.bert(query_embeds=emb, query_length=qformer.num_queries, attention_mask=mask,
                       encoder_hidden_states=image_embeds).last_hidden_state
    h = qformer.itg_transform(out[:, qformer.num_queries:])
    return torch.nn.functional.linear(h, qformer.embeddings.word_embeddings.weight, qformer.itg_bias)


# freq 1: every layer cross-attends (the demo); freq 2 with 3 layers: layers without cross-attention too
@pytest.fixture(scope="module", params=[[], ["model.qformer.num_layers=3", "model.qformer.cross_attention_freq=2"]],
                ids=["demo", "freq2"])
def cfg(tokenizers, request):
    return demo_config(tokenizers, *request.param)


def test_itg_logits_from_the_query_pass_equal_the_full_pass(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batch = make_batch(cfg, captions=CAPTIONS[:4])
    ids, mask = batch["text_input_ids"].clone(), batch["text_attention_mask"]
    ids[:, 0] = model.dec_token_id
    for b, qformer in model.qformers.items():
        embeds = qformer.image_embeds(model.encode(batch, b))
        queries, kv = qformer.queries_with_kv(embeds)
        assert len(kv) == len(qformer.bert.encoder.layer)
        assert torch.equal(queries, qformer.queries(embeds))  # the hooks change nothing
        new = qformer.decode(ids, mask, query_kv=kv)
        ref = reference_decode(qformer, ids, mask, embeds)
        assert new.shape == ref.shape
        assert (new - ref).abs().max() < 1e-5
        assert (qformer.decode(ids, mask, embeds) - ref).abs().max() < 1e-5  # kv computed when not given
        assert not any(m._forward_hooks for m in qformer.modules())  # the recording hooks are gone


def _stage1(model, batch, reference: bool, monkeypatch):
    """stage1_loss and the gradients of every trainable; ``reference``: through the former code path
    (queries() then the full ITG pass over the image embeddings)."""
    with monkeypatch.context() as m:
        if reference:
            m.setattr(QFormer, "queries_with_kv", lambda self, embeds: (self.queries(embeds), embeds))
            # the full head on every position, then the positions asked for (stage 1: the labelled ones)
            m.setattr(QFormer, "decode", lambda self, ids, mask, image_embeds=None, query_kv=None, positions=None:
                      reference_decode(self, ids, mask, query_kv)[positions if positions is not None else ...])
        model.zero_grad()
        out = model.stage1_loss(batch, generator=torch.Generator().manual_seed(3))
        out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.trainable_named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, grads


def test_stage1_losses_and_gradients_equal_the_former_implementation(cfg, monkeypatch):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batch = make_batch(cfg, domains=[0, 1, 0, 1, 1, 1, 0, 1])
    new, new_grads = _stage1(model, batch, False, monkeypatch)
    ref, ref_grads = _stage1(model, batch, True, monkeypatch)
    for key in ("loss", "itc", "itm", "itg", "clip/itg", "sam/itg"):
        assert abs(float(new[key].detach()) - float(ref[key].detach())) < 1e-5, key
    assert float(new["itg"]) > 0
    assert new_grads.keys() == ref_grads.keys()
    worst = max((new_grads[n] - ref_grads[n]).abs().max().item() for n in new_grads)
    assert worst < 1e-5
