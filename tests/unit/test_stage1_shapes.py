"""Stage 1 at its own shapes (issue 20): text padded to the longest caption over all ranks (a multiple of
8), the ITG head on labelled positions only, ITM fetching only its hard-negative rows, the precision of
ITC and of the touches, and gathered tensors whose ``requires_grad`` does not depend on the routing.

The 2-rank tests run gloo in forked processes, as tests/unit/test_model_losses.py does."""
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from helpers.model_kit import CAPTIONS, demo_config, make_batch, one_thread

from msmedcap.models import build_model
from msmedcap.models import stage1
from msmedcap.models.msmedcap_model import MSMedCap
from msmedcap.tokenization import load_qformer_tokenizer

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

SHORT = ["two cats sleeping on a red sofa", "a bowl of fruit on a wooden table",
         "a dog running on the beach at sunset", "axial ct scan of the abdomen with contrast"]
# rank 1's batch holds one caption longer than any of rank 0's
LONG = [CAPTIONS[1] + " and " + CAPTIONS[3], CAPTIONS[2], CAPTIONS[6], CAPTIONS[5]]


@pytest.fixture(scope="module")
def cfg(tokenizers):
    return demo_config(tokenizers)


def _run_two_ranks(worker, *args) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.start_processes(_rank_main, args=(port, worker, args, result), nprocs=2, start_method="fork")
    return dict(result)


def _rank_main(rank, port, worker, args, result):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        result[rank] = worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _record_text_widths(model):
    widths = {b: [] for b in model.branches}
    handles = [q.embeddings.register_forward_hook(
        lambda m, args, kwargs, out, b=b: widths[b].append(kwargs["input_ids"].shape[1]) if kwargs.get("input_ids")
        is not None else None, with_kwargs=True) for b, q in model.qformers.items()]
    return widths, handles


def _token_lengths(cfg, captions) -> list:
    tok = load_qformer_tokenizer(cfg.model.qformer.tokenizer)
    return [len(tok(c).input_ids) for c in captions]


# --------------------------------------------------------------------------- text length
def _width_worker(rank, tokenizers):
    cfg = demo_config(tokenizers)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    # all medical: the SAM branch has every sample, the CLIP branch none on either rank
    batch = make_batch(cfg, captions=SHORT if rank == 0 else LONG, domains=[1] * 4, seed=rank)
    widths, handles = _record_text_widths(model)
    out = model.stage1_loss(batch)
    out["loss"].backward()
    for h in handles:
        h.remove()
    return {"widths": widths, "sam_itc": out["sam/itc"].item()}


def test_text_is_padded_to_the_longest_caption_of_all_ranks_rounded_to_8(tokenizers, cfg):
    short, long = max(_token_lengths(cfg, SHORT)), max(_token_lengths(cfg, LONG))
    expected = -(-long // 8) * 8
    assert -(-short // 8) * 8 < expected < cfg.model.qformer.max_text_len  # rank 0 alone would pad less
    result = _run_two_ranks(_width_worker, tokenizers)
    for rank in (0, 1):
        # the text pass, the 3 ITM pairs and ITG: every text tensor of the SAM branch has the global width
        assert result[rank]["widths"]["sam"] and set(result[rank]["widths"]["sam"]) == {expected}, result[rank]
        assert result[rank]["widths"]["clip"] == []  # no CLIP sample anywhere: no text pass
    # one process over both batches: the same width (results do not depend on the world size)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    b0, b1 = (make_batch(cfg, captions=c, domains=[1] * 4, seed=r) for r, c in ((0, SHORT), (1, LONG)))
    both = {k: (v + b1[k] if isinstance(v, list) else _cat_padded(v, b1[k])) for k, v in b0.items()}
    widths, handles = _record_text_widths(model)
    out = model.stage1_loss(both)
    for h in handles:
        h.remove()
    assert set(widths["sam"]) == {expected}
    assert (result[0]["sam_itc"] + result[1]["sam_itc"]) / 2 == pytest.approx(out["sam/itc"].item(), abs=1e-3)


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of two batches (each text padded to its own longest: zeros up to the wider)."""
    if a.dim() == 2 and a.shape[1] != b.shape[1]:
        width = max(a.shape[1], b.shape[1])
        a, b = (F.pad(t, (0, width - t.shape[1])) for t in (a, b))
    return torch.cat([a, b])


def test_text_length_rounds_up_to_8_within_the_cap():
    mask = torch.tensor([[1] * 5 + [0] * 7, [1] * 3 + [0] * 9])
    assert stage1.text_length(mask, 320) == 8
    assert stage1.text_length(torch.ones(2, 17, dtype=torch.long), 320) == 24
    assert stage1.text_length(torch.ones(2, 17, dtype=torch.long), 20) == 20  # capped at max_text_len
    assert stage1.text_length(torch.ones(2, 17, dtype=torch.long), 12) == 17  # never cuts a caption
    assert stage1.text_length(torch.zeros(0, 12, dtype=torch.long), 320) == 8  # no routed row


def test_stage1_losses_do_not_depend_on_the_padded_width(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batch = make_batch(cfg, domains=[0, 1, 0, 1, 1, 1, 0, 1])  # padded to max_text_len (32)
    longest = int(batch["text_attention_mask"].sum(1).max())
    trimmed = dict(batch, text_input_ids=batch["text_input_ids"][:, :longest],
                   text_attention_mask=batch["text_attention_mask"][:, :longest])
    a = model.stage1_loss(batch, generator=torch.Generator().manual_seed(1))
    b = model.stage1_loss(trimmed, generator=torch.Generator().manual_seed(1))
    for k in ("loss", "itc", "itm", "itg"):
        assert float(a[k].detach()) == pytest.approx(float(b[k].detach()), abs=1e-5), k


# --------------------------------------------------------------------------- ITG head
def test_itg_head_on_labelled_positions_equals_the_full_head(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    qformer = model.qformers["sam"]
    batch = make_batch(cfg, captions=CAPTIONS[:4])
    ids, mask = batch["text_input_ids"].clone(), batch["text_attention_mask"]
    ids[:, 0] = model.dec_token_id
    embeds = qformer.image_embeds(model.encode(batch, "sam"))
    _, kv = qformer.queries_with_kv(embeds)
    # before: logits at every position, CE ignoring the padding
    logits = qformer.decode(ids, mask, query_kv=kv)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    full = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=stage1.LABEL_SMOOTHING)
    rows = []
    handle = qformer.itg_transform.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        new = stage1.itg_loss(qformer, ids, mask, kv)
    finally:
        handle.remove()
    assert rows == [int(mask[:, 1:].sum())]  # the head ran on the labelled positions only
    assert float(new.detach()) == pytest.approx(float(full.detach()), abs=1e-6)
    g_new = torch.autograd.grad(new, qformer.itg_bias, retain_graph=True)[0]
    g_full = torch.autograd.grad(full, qformer.itg_bias)[0]
    assert (g_new - g_full).abs().max() < 1e-7


# --------------------------------------------------------------------------- ITM hard negatives
def _full_gather_fetch(x, want, rows):
    """The former path: every rank's image embeds gathered (with gradient), then the rows drawn."""
    return stage1.gather_rows(x, rows, with_grad=x.requires_grad)[want]


def _itm_worker(rank, tokenizers):
    cfg = demo_config(tokenizers)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    # rank 0: general + medical; rank 1: medical only, so no CLIP sample there (it still serves its rows)
    batch = make_batch(cfg, domains=[0, 0, 1, 1] if rank == 0 else [1, 1, 1, 1], seed=rank)
    runs, gathered = {}, []
    real_gather = stage1.gather
    stage1.gather = lambda x, with_grad: gathered.append(tuple(x.shape)) or real_gather(x, with_grad)
    try:
        for name in ("fetch", "full"):
            if name == "full":
                stage1.fetch_rows = _full_gather_fetch
            model.zero_grad()
            out = model.stage1_loss(batch, generator=torch.Generator().manual_seed(7 + rank))
            out["loss"].backward()
            runs[name] = {"losses": {k: float(v) for k, v in out.items() if v.numel() == 1},
                          "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                          "gathered": list(gathered)}
            gathered.clear()
    finally:
        stage1.gather = real_gather
    token_shapes = {(model.encoders[b].num_tokens, model.encoders[b].width) for b in model.branches}
    return {"runs": runs, "token_shapes": token_shapes}


def test_itm_hard_negative_fetch_equals_the_full_gather(tokenizers):
    result = _run_two_ranks(_itm_worker, tokenizers)
    for rank in (0, 1):
        fetch, full = result[rank]["runs"]["fetch"], result[rank]["runs"]["full"]
        assert fetch["losses"].keys() == full["losses"].keys()
        for k, v in fetch["losses"].items():
            assert v == pytest.approx(full["losses"][k], abs=1e-6), (rank, k)
        assert fetch["grads"].keys() == full["grads"].keys()
        for n, g in fetch["grads"].items():
            assert torch.allclose(g, full["grads"][n], atol=1e-6, rtol=1e-5), (rank, n)
        # the gradient reaches the owners' ln_vision through the negatives
        assert fetch["grads"]["qformers.sam.ln_vision.weight"].abs().sum() > 0
        # no encoder-token tensor is all-gathered any more (the former path gathered one per branch)
        token_shaped = lambda shapes: [s for s in shapes if s[1:] in result[rank]["token_shapes"]]
        assert token_shaped(fetch["gathered"]) == [] and len(token_shaped(full["gathered"])) == 2


# --------------------------------------------------------------------------- requires_grad across ranks
def _grad_worker(rank, tokenizers, token_mlp):
    import torch.distributed as dist

    # SAM without ln_vision (as the paper preset; with token_mlp its embeds are the adapter's output, in the
    # encoder's transposed layout) and routed so that rank 0 has no SAM sample
    cfg = demo_config(tokenizers, "model.sam.ln_vision=false", "model.routing.general=[clip]",
                      "model.routing.medical=[sam]", f"model.sam.token_mlp={token_mlp}")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batch = make_batch(cfg, domains=[0, 0, 0, 0] if rank == 0 else [1, 1, 0, 1], seed=rank)
    flags = []
    real_gather, real_fetch = stage1.gather, getattr(stage1, "fetch_rows", None)
    stage1.gather = lambda x, with_grad: flags.append(("gather", tuple(x.shape[1:]), x.requires_grad)) \
        or real_gather(x, with_grad)
    if real_fetch is not None:
        stage1.fetch_rows = lambda x, want, rows: flags.append(("fetch", tuple(x.shape[1:]), x.requires_grad)) \
            or real_fetch(x, want, rows)
    try:
        out = model.stage1_loss(batch)
    finally:
        stage1.gather = real_gather
        if real_fetch is not None:
            stage1.fetch_rows = real_fetch
    everyone = [None, None]
    dist.all_gather_object(everyone, flags)
    if everyone[0] != everyone[1]:  # checked before backward, which would wait on a missing collective
        raise AssertionError(f"gathered tensors differ across ranks: {everyone}")
    out["loss"].backward()
    return {"flags": flags}


@pytest.mark.parametrize("token_mlp", [0, 4])
def test_gathered_tensors_need_grad_alike_on_every_rank(tokenizers, token_mlp):
    result = _run_two_ranks(_grad_worker, tokenizers, token_mlp)
    assert result[0]["flags"] == result[1]["flags"] and result[0]["flags"]


# --------------------------------------------------------------------------- precision
class _Params:
    def __init__(self, params):
        self.params = params

    def trainable_named_parameters(self):
        return [(f"p{i}", p) for i, p in enumerate(self.params)]


def test_touch_is_finite_in_fp16_where_a_whole_sum_overflows():
    big = torch.nn.Parameter(torch.full((4096,), 1000.0, dtype=torch.float16))  # sums to 4.1e6 > fp16's 65504
    small = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    assert torch.isinf(big.sum())
    zero = MSMedCap._touch_trainables(_Params([big, small]))
    assert torch.isfinite(zero) and float(zero.detach()) == 0
    zero.backward()
    assert big.grad is not None and small.grad is not None and big.grad.abs().sum() == 0


def test_stage1_losses_are_finite_in_fp16_where_whole_sums_overflow(cfg):
    """The former anchor, ``0 * embeds_all.sum()``, is NaN once the gathered image embeds sum past fp16's
    65504 (paper: 800 x 256 x 4096 SAM tokens); the former n == 0 touch summed whole parameters."""
    torch.manual_seed(0)
    model = build_model(cfg.model)
    qformer = model.qformers["sam"].half()
    qformer.ln_vision.bias.data.fill_(100.0)  # image embeds ~100 each: 2 x 256 x 32 of them sum to ~1.6e6
    qformer.embeddings.word_embeddings.weight.data[5:].fill_(1000.0)  # a whole-parameter sum overflows
    batch = make_batch(cfg, captions=CAPTIONS[:2])
    tokens = model.encode(batch, "sam").half()
    for n in (2, 0):
        out = stage1.stage1_branch_loss(qformer, tokens[:n], batch["text_input_ids"][:n],
                                        batch["text_attention_mask"][:n], 2, model.dec_token_id)
        assert all(torch.isfinite(v) for v in out.values()), (n, out)
        qformer.zero_grad()
        sum(out.values()).backward()
        assert qformer.query_tokens.grad is not None and torch.isfinite(qformer.query_tokens.grad).all()


def test_itc_logits_are_fp32_for_bf16_features():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(3, 4, 8, generator=g), dim=-1).bfloat16()
    txt = F.normalize(torch.randn(3, 8, generator=g), dim=-1).bfloat16()
    temp = torch.tensor([0.07], dtype=torch.bfloat16)
    sim_i2t, sim_t2i = stage1.itc_logits(img, txt, img, txt, temp)
    assert sim_i2t.dtype == sim_t2i.dtype == torch.float32
    ref = torch.einsum("nqd,md->nmq", img.float(), txt.float()).amax(-1) / temp.float()
    assert torch.allclose(sim_i2t, ref, atol=1e-5)


def test_temperature_clamp_acts_in_the_forward_not_on_the_parameter(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batch = make_batch(cfg, domains=[1] * 8)

    def itc(temp: float):
        model.qformers["sam"].temp.data.fill_(temp)
        model.zero_grad()
        out = model.stage1_loss(batch, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        return float(out["sam/itc"]), float(model.qformers["sam"].temp.detach()), float(model.qformers["sam"].temp.grad)

    at_bound, _, grad_at_bound = itc(0.5)
    beyond, param, grad_beyond = itc(5.0)  # as an optimizer's master copy past the bound
    assert beyond == pytest.approx(at_bound, abs=1e-6)  # the forward used 0.5
    assert param == 5.0  # the clamp did not write the module copy (the master would overwrite it)
    # the gradient is the one at the bound where it points back inside (a descent step lowers temp), else 0
    assert grad_at_bound != 0
    assert grad_beyond == (pytest.approx(grad_at_bound, rel=1e-5) if grad_at_bound > 0 else 0)


def test_bounded_gradient_passes_inward_only():
    x = torch.tensor([0.0005, 0.07, 0.9], requires_grad=True)
    y = stage1._Bounded.apply(x, 0.001, 0.5)
    assert y.tolist() == pytest.approx([0.001, 0.07, 0.5])
    (g,) = torch.autograd.grad(y, x, torch.tensor([-1.0, 1.0, 1.0]))  # all point inward (descent: x -= lr g)
    assert g.tolist() == [-1.0, 1.0, 1.0]
    (g,) = torch.autograd.grad(stage1._Bounded.apply(x, 0.001, 0.5), x, torch.tensor([1.0, -1.0, -1.0]))
    assert g.tolist() == [0.0, -1.0, 0.0]  # outward: stopped, as clamp
