"""The demo's frozen language model: a tiny OPT pre-trained to read its context.

MSMedCap (like BLIP-2) keeps a *pre-trained* OPT frozen and learns only to steer it through the
prefix. What makes a real OPT steerable is that any fact stated in its context can change what it
writes. A tiny LM trained on bare captions is not: only its first words follow the prefix (measured:
fed the embeddings of "two red circles on a white background." it wrote "... grey background.").

So the demo's stand-in for OPT-2.7B is trained on the layout the captioner feeds it,
``[prefix | bos + prompt + caption + "\\n"]``, where the prefix stands in for the soft prompts and
projected queries: in the same number of positions as stage 2 (soft prompts + queries of one or of
two branches), the token embeddings of *every* distinct token of the caption, the remaining
positions filled with repeats, in shuffled order, with noise. It learns that the caption says
exactly what the context holds, whichever position holds it: the contract stage 2's projections
then have to meet, and that :func:`steer_accuracy` checks (greedy decoding from such a prefix must
reproduce held-out captions; tests/demo/test_demo_lm.py).

    msmedcap demo lm            # rewrites msmedcap/assets/opt-demo (~3 CPU minutes)
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

from msmedcap.batch import CAPTION_EOS
from msmedcap.config import load_config

OUT = Path(__file__).resolve().parent.parent / "assets" / "opt-demo"
PREFIX_NOISE = 0.5  # noise sd, in units of the embedding matrix's sd (training draws 0..2x this)
PLACED_P = 0.5  # share of training prefixes whose hints carry their place (the rest: words only)
DROP_P = 0.1  # share of training prefixes with one caption token left out (the LM must not rely on every word)


def demo_lm_config():
    # the LM this module trains starts random (the shipped one is its result)
    return load_config("demo", ["model.lm.name_or_path=null", "model.allow_random_weights=true"],
                       check_files=False).model


def prefix_lengths(model_cfg) -> tuple:
    """Stage 2's prefix sizes before bos + prompt: soft prompts + queries of one branch, of two."""
    s, q = model_cfg.lm.num_soft_prompts, model_cfg.qformer.num_query_tokens
    return s + q, s + 2 * q


def hint_ids(caption_ids: Sequence[int], k: int, rng: random.Random, drop: bool = False) -> list:
    """``k`` (token id, place in the caption) pairs: every token of the caption (one left out if
    ``drop``), the remaining positions repeats of them, shuffled."""
    hints = list(enumerate(caption_ids))
    if drop and len(hints) > 1:
        hints.pop(rng.randrange(len(hints)))
    if len(hints) > k:
        raise ValueError(f"caption has {len(hints)} tokens, more than the prefix's {k} positions")
    hints = hints + [rng.choice(hints) for _ in range(k - len(hints))]
    rng.shuffle(hints)
    return [(t, i) for i, t in hints]


def hint_prefix(lm, hints: list, noise: float, placed=True, generator: torch.Generator = None):
    """``[B, k, D]``: each hint's token embedding, plus (where ``placed``, a bool per row) the LM's
    own position embedding of the token's place in the caption, plus Gaussian noise of ``noise`` x
    the token embeddings' sd. The place is what keeps a shuffled prefix unambiguous: "one yellow
    circle and two blue triangles" and "one blue circle and two yellow triangles" hold the same words."""
    embed = lm.get_input_embeddings()
    ids = torch.tensor([[t for t, _ in row] for row in hints])
    places = torch.tensor([[i for _, i in row] for row in hints])
    e = embed(ids)
    pos = lm.model.decoder.embed_positions.weight[places + lm.model.decoder.embed_positions.offset]
    placed = torch.as_tensor(placed, dtype=e.dtype).reshape(-1, 1, 1)
    e = e + placed * pos.to(e.dtype)
    sd = embed.weight.std()
    return e + noise * sd * torch.randn(e.shape, generator=generator, dtype=e.dtype)


def _encode(tok, captions: Sequence[str], max_len: int) -> list:
    """Each caption's ids + the end token, as training's LM targets (``encode_lm_captions``: a long
    caption is cut before the end token, which stays). The demo captions all fit, so the shipped
    asset's rebuild is unchanged."""
    from msmedcap.tokenization import encode_lm_captions

    enc = encode_lm_captions(tok, list(captions), max_len)
    return [row[: int(n)].tolist() for row, n in zip(enc["input_ids"], enc["attention_mask"].sum(1))]


def pretrain_demo_lm(out_dir: str | Path = OUT, steps: int = 2000, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0, log_every: int = 250) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    from msmedcap.demo.world import demo_captions
    from msmedcap.tokenization import load_lm_tokenizer

    model_cfg = demo_lm_config()
    cfg = model_cfg.lm
    lengths = prefix_lengths(model_cfg)
    tok = load_lm_tokenizer(cfg.tokenizer)
    prompt = tok(cfg.prompt, add_special_tokens=True).input_ids
    captions = _encode(tok, demo_captions(seed), cfg.max_caption_len)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    lm = OPTForCausalLM(OPTConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, **cfg.config))
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    embed = lm.get_input_embeddings()
    lm.train()
    for step in range(steps):
        batch = rng.sample(captions, batch_size)
        texts = [prompt + c for c in batch]
        width = max(map(len, texts))
        ids = torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in texts])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :len(prompt)] = -100  # the loss is on captions, as in stage 2
        k = rng.choice(lengths)
        hints = [hint_ids(c[:-1], k, rng, drop=rng.random() < DROP_P) for c in batch]  # c[-1] is the EOS
        placed = [rng.random() < PLACED_P for _ in batch]
        prefix = hint_prefix(lm, hints, PREFIX_NOISE * 2 * rng.random(), placed)
        embeds = torch.cat([prefix, embed(ids)], dim=1)
        mask = torch.cat([mask.new_ones(batch_size, k), mask], dim=1)
        labels = torch.cat([labels.new_full((batch_size, k), -100), labels], dim=1)
        loss = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: caption loss {loss.item():.4f}", flush=True)
    out_dir = Path(out_dir)
    lm.save_pretrained(out_dir)  # config.json + model.safetensors
    return out_dir


@torch.no_grad()
def steer_accuracy(lm, tok, prompt: str, captions: Sequence[str], k: int, noise: float = PREFIX_NOISE,
                   seed: int = 0, batch_size: int = 100, max_len: int = 32) -> tuple:
    """Share of ``captions`` that greedy decoding reproduces exactly from a prefix of their own tokens'
    embeddings (``k`` positions, shuffled, with noise) followed by bos + prompt; and the misses."""
    from transformers import GenerationConfig

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    embed = lm.get_input_embeddings()
    prompt_ids = torch.tensor(tok(prompt, add_special_tokens=True).input_ids)
    eos = tok(CAPTION_EOS, add_special_tokens=False).input_ids[0]
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_len, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    lm.eval()
    right, misses = 0, []
    for i in range(0, len(captions), batch_size):
        chunk = list(captions[i:i + batch_size])
        hints = [hint_ids(tok(c, add_special_tokens=False).input_ids, k, rng) for c in chunk]
        prefix = hint_prefix(lm, hints, noise, True, gen)
        embeds = torch.cat([prefix, embed(prompt_ids).expand(len(chunk), -1, -1)], dim=1).to(embed.weight.dtype)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        out = lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
        for ref, pred in zip(chunk, tok.batch_decode(out, skip_special_tokens=True)):
            if pred.strip() == ref:
                right += 1
            else:
                misses.append((ref, pred.strip()))
    return right / len(captions), misses


def shipped_steer_accuracy(k: int = None, n_per_domain: int = 150, path: str | Path = OUT) -> tuple:
    """:func:`steer_accuracy` of the demo LM at ``path`` (the shipped asset) on the demo's held-out
    (eval) captions."""
    from transformers import OPTForCausalLM

    from msmedcap.demo.world import demo_sample
    from msmedcap.tokenization import load_lm_tokenizer

    model_cfg = demo_lm_config()
    captions = [demo_sample(0, "eval", d, i)["txt"] for d in ("general", "medical") for i in range(n_per_domain)]
    lm = OPTForCausalLM.from_pretrained(path)
    return steer_accuracy(lm, load_lm_tokenizer(model_cfg.lm.tokenizer), model_cfg.lm.prompt, captions,
                          k or prefix_lengths(model_cfg)[0])
