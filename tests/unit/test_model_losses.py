"""Stage-1 heads (ITC, ITM, ITG), routing, stage-2 layout and loss, encoder reuse, distributed gather."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.model_kit import CAPTIONS, demo_config, make_batch, one_thread

from msmedcap.models import build_model
from msmedcap.models.stage1 import itc_logits, itc_loss, itm_inputs

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def cfg(tokenizers):
    return demo_config(tokenizers)


@pytest.fixture(scope="module")
def model(cfg):
    return build_model(cfg.model)


def test_itc_is_lower_on_aligned_pairs_than_on_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    n, q, d = 8, 4, 16
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    image = F.normalize(torch.randn(n, q, d, generator=g), dim=-1)
    image[:, 2] = text  # one query of each image matches its caption exactly: max over queries finds it
    temp, targets = torch.tensor(0.07), torch.arange(n)
    aligned = itc_loss(*itc_logits(image, text, image, text, temp), targets)
    perm = torch.roll(torch.arange(n), 1)
    shuffled = itc_loss(*itc_logits(image, text[perm], image, text[perm], temp), targets)
    assert aligned < 1.0 < 3.0 < shuffled
    # label smoothing 0.1: even a perfect match costs the entropy of the smoothed targets
    smoothed = torch.full((n,), 0.1 / n)
    smoothed[0] += 0.9
    assert aligned > -(smoothed * smoothed.log()).sum()


def test_itm_pairs_positives_with_label_1_and_mined_negatives_with_0():
    n = 4
    embeds = torch.arange(n).float().view(n, 1, 1).expand(n, 3, 2)  # image i is filled with i
    ids = torch.arange(n).view(n, 1).expand(n, 5)  # text i is filled with i
    mask = torch.ones(n, 5, dtype=torch.long)
    hard = torch.full((n, n), -50.0)
    hard[torch.arange(n), (torch.arange(n) + 1) % n] = 50.0  # the hardest negative of i is i+1
    hard[torch.arange(n), torch.arange(n)] = 100.0  # the positive scores highest but is never drawn
    images, texts, _, labels = itm_inputs(embeds, ids, mask, embeds, ids, mask, hard, hard, torch.arange(n))
    assert labels.tolist() == [1] * n + [0] * 2 * n
    image_of, text_of = images[:, 0, 0].long(), texts[:, 0]
    assert torch.equal(image_of[:n], text_of[:n])  # positives: matching pairs
    assert (image_of[n:] != text_of[n:]).all()  # negatives: never the pair itself
    assert torch.equal(image_of[n:2 * n], (torch.arange(n) + 1) % n)  # mined: the hardest image per text
    assert torch.equal(text_of[2 * n:], (torch.arange(n) + 1) % n)  # mined: the hardest text per image


def test_itg_mask_and_causality(model, cfg):
    qformer = model.qformers["sam"].eval()
    nq = qformer.num_queries
    mask = torch.tensor([[1, 1, 1, 0]])
    allowed = qformer.itg_mask(mask, torch.float32)[0, 0] == 0
    assert allowed[:nq, :nq].all() and not allowed[:nq, nq:].any()  # queries never see the text
    assert allowed[nq:, :nq].all()  # text sees every query
    assert torch.equal(allowed[nq:, nq:], torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]).bool())

    batch = make_batch(cfg, captions=CAPTIONS[:2])
    ids, tmask = batch["text_input_ids"].clone(), batch["text_attention_mask"]
    ids[:, 0] = model.dec_token_id
    embeds = qformer.image_embeds(model.encode(batch, "sam"))
    with torch.no_grad():
        logits = qformer.decode(ids, tmask, embeds)
        later = ids.clone()
        later[:, 5:] = 7  # change the text after position 4
        assert torch.allclose(qformer.decode(later, tmask, embeds)[:, :5], logits[:, :5], atol=1e-5)
        assert not torch.allclose(qformer.decode(later, tmask, embeds)[:, 5:], logits[:, 5:], atol=1e-3)
        other = copy.deepcopy(qformer)
        other.query_tokens.normal_()  # other queries: the text sees them (the first token included)
        assert (other.decode(ids, tmask, embeds)[:, :5] - logits[:, :5]).abs().amax(-1).gt(1e-4).all()
    qformer.train()


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_routing_sends_medical_samples_to_the_sam_branch_only(model, cfg):
    domains = [1, 0, 1, 1, 0, 1, 1, 1]  # 1 = medical
    assert model.route(torch.tensor(domains)).tolist() == [[d == 0, True] for d in domains]
    clip_calls, h1 = count_calls(model.encoders["clip"])
    sam_calls, h2 = count_calls(model.encoders["sam"])
    try:
        model.zero_grad()
        out = model.stage1_loss(make_batch(cfg, domains=domains))
        # each encoder ran once, on exactly the samples routed to it, shared by ITC/ITM/ITG
        assert clip_calls == [2] and sam_calls == [8]
        assert all(out[f"{b}/{h}"] > 0 for b in ("clip", "sam") for h in ("itc", "itm", "itg"))

        model.zero_grad()
        out = model.stage1_loss(make_batch(cfg, domains=[1] * 8))  # an all-medical batch
        assert clip_calls == [2] and sam_calls == [8, 8]  # the CLIP encoder did not run
        assert out["clip/itc"] == out["clip/itm"] == out["clip/itg"] == 0
        out["loss"].backward()
        clip_grad = model.qformers["clip"].query_tokens.grad
        assert clip_grad is not None and clip_grad.abs().sum() == 0  # touched (DDP-safe), not trained
        assert model.qformers["sam"].query_tokens.grad.abs().sum() > 0
    finally:
        h1.remove(), h2.remove()
        model.zero_grad()


def test_stage2_input_order_and_loss_on_caption_tokens_only(model, cfg):
    model.eval()  # no Q-Former dropout: the passes below are compared
    batch = make_batch(cfg)
    cap = model.captioner
    queries = model.query_outputs(batch)
    prefix = cap.prefix(queries)
    nq, ns = cfg.model.qformer.num_query_tokens, cfg.model.lm.num_soft_prompts
    assert prefix.shape[1] == ns + 2 * nq + len(cap.prompt_ids)
    assert torch.equal(prefix[:, :ns], cap.soft_prompts.expand(8, -1, -1).to(prefix.dtype))
    assert torch.equal(prefix[:, ns:ns + nq], cap.projections["clip"](queries["clip"]).to(prefix.dtype))
    assert torch.equal(prefix[:, ns + nq:ns + 2 * nq], cap.projections["sam"](queries["sam"]).to(prefix.dtype))
    assert cap.tokenizer.decode(cap.prompt_ids, skip_special_tokens=True) == cfg.model.lm.prompt

    logits = model.caption_logits(batch)
    ids, mask = batch["lm_input_ids"], batch["lm_attention_mask"]
    expected = F.cross_entropy(logits[mask.bool()].float(), ids[mask.bool()])
    assert torch.allclose(model.stage2_loss(batch)["lm"], expected, atol=1e-4)
    padded = dict(batch, lm_input_ids=ids.masked_fill(mask == 0, 5))  # other pad ids: same loss
    assert torch.allclose(model.stage2_loss(padded)["lm"], expected, atol=1e-4)
    model.train()


def test_stage2_learns_to_caption_and_stops_at_newline(tokenizers):
    cfg = demo_config(tokenizers, "model.variant=sam-blip2", "model.frozen_dtype=fp32")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    # a frozen random LM cannot be steered; like OPT, it first learns the language (here: the captions)
    lm = model.captioner.lm
    text = model.captioner.tokenizer([c + "\n" for c in CAPTIONS], padding="longest", return_tensors="pt")
    lm.requires_grad_(True)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        lm(**text, labels=text.input_ids.masked_fill(text.attention_mask == 0, -100)).loss.backward()
        opt.step()
    lm.requires_grad_(False)

    batch = make_batch(cfg, captions=CAPTIONS[:2])
    before = model.eval().generate(batch, num_beams=3, min_len=1, max_len=30)
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=3e-3)
    for _ in range(80):
        opt.zero_grad()
        loss = model.stage2_loss(batch)["loss"]
        loss.backward()
        opt.step()
    assert loss < 0.5, loss
    # each image gets its own caption, cut at the newline
    after = model.eval().generate(batch, num_beams=3, min_len=1, max_len=30)
    assert after == CAPTIONS[:2] != before, (before, after)


def _distributed_worker(rank, world, port, tokenizers, result):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = demo_config(tokenizers)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()  # no dropout: compared with one process below
    # rank 0: general + medical; rank 1: medical only, so no CLIP sample there
    batch = make_batch(cfg, domains=[0, 0, 1, 1] if rank == 0 else [1, 1, 1, 1], seed=rank)
    out = model.stage1_loss(batch)
    out["loss"].backward()  # would hang if rank 1 skipped the gathers' backward
    result[rank] = {"sam_itc": out["sam/itc"].item(), "clip_itc": out["clip/itc"].item()}
    dist.destroy_process_group()


def test_itc_gathers_across_ranks_like_one_big_batch(tokenizers, cfg):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    # fork: the ranks reuse this process's imports (spawn would pay ~10 s of imports per rank)
    mp.start_processes(_distributed_worker, args=(2, port, tokenizers, result), nprocs=2, start_method="fork")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    b0, b1 = make_batch(cfg, domains=[0, 0, 1, 1], seed=0), make_batch(cfg, domains=[1, 1, 1, 1], seed=1)
    both = {k: (v + b1[k] if isinstance(v, list) else torch.cat([v, b1[k]])) for k, v in b0.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same reduction order
    try:
        out = model.stage1_loss(both)
    finally:
        torch.set_num_threads(threads)
    # ITC: each rank's rows against all ranks' columns; equal row counts, so the mean over ranks is the
    # one-batch loss (SAM: 4 + 4 samples). CLIP: only rank 0 has samples; rank 1 contributes 0.
    # (a wrong gather is off by far more than 1e-3: the logits are / temp = 0.07, amplifying float noise)
    assert (result[0]["sam_itc"] + result[1]["sam_itc"]) / 2 == pytest.approx(out["sam/itc"].item(), abs=1e-3)
    assert result[0]["clip_itc"] == pytest.approx(out["clip/itc"].item(), abs=1e-3) and result[1]["clip_itc"] == 0
