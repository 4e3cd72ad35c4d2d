"""The demo's frozen language model: a tiny OPT pre-trained on the demo's training captions.

MSMedCap (like BLIP-2) keeps a *pre-trained* OPT frozen and learns only to steer it. A randomly
initialised tiny OPT cannot be steered: its output distribution is nearly uniform whatever the
prefix (stage-2 loss stays at ~ln(vocabulary)). So the demo ships this stand-in for OPT-2.7B,
trained here on the layout the captioner feeds it: ``[prefix | bos + prompt + caption + "\\n"]``.

The prefix stands in for the projected queries: a variable number of positions holding the
embeddings of some of the caption's own tokens, shuffled, with noise. A real OPT has learnt to use
what its context says; a tiny LM trained on bare captions has not, and then no prefix can choose
its first word (measured: the first token's distribution was the caption prior, whatever the image).
This teaches it, in the same positions as stage 2, that the context tells what the caption says:

    python -m msmedcap.train.demo_lm            # rewrites msmedcap/assets/opt-demo (~1 minute)
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from msmedcap.batch import CAPTION_EOS
from msmedcap.config import load_config

OUT = Path(__file__).resolve().parent.parent / "assets" / "opt-demo"
MIN_PREFIX, MAX_PREFIX = 8, 24  # the demo's 4 soft prompts + 8 queries per branch: 12 or 20
PREFIX_NOISE = 0.5


def pretrain_demo_lm(out_dir: str | Path = OUT, steps: int = 600, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    from msmedcap.data.demo import demo_captions
    from msmedcap.tokenization import load_lm_tokenizer

    cfg = load_config("demo", ["model.lm.name_or_path=null"], check_files=False).model.lm
    tok = load_lm_tokenizer(cfg.tokenizer)
    prompt = tok(cfg.prompt, add_special_tokens=True).input_ids
    texts = [prompt + tok(c + CAPTION_EOS, add_special_tokens=False).input_ids[:cfg.max_caption_len]
             for c in demo_captions(seed)]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    lm = OPTForCausalLM(OPTConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, **cfg.config))
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    embed = lm.get_input_embeddings()
    lm.train()
    for step in range(steps):
        batch = rng.sample(texts, batch_size)
        width = max(map(len, batch))
        ids = torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in batch])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in batch])
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :len(prompt)] = -100  # the loss is on captions, as in stage 2
        # prefix: as many positions as stage 2's soft prompts + queries (one or two branches)
        k = rng.randint(MIN_PREFIX, MAX_PREFIX)
        hints = torch.tensor([[rng.choice(t[len(prompt):]) for _ in range(k)] for t in batch])
        prefix = embed(hints) + PREFIX_NOISE * embed.weight.std() * torch.randn(batch_size, k, embed.embedding_dim)
        embeds = torch.cat([prefix, embed(ids)], dim=1)
        mask = torch.cat([mask.new_ones(batch_size, k), mask], dim=1)
        labels = torch.cat([labels.new_full((batch_size, k), -100), labels], dim=1)
        loss = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{steps}: caption loss {loss.item():.3f}", flush=True)
    out_dir = Path(out_dir)
    lm.save_pretrained(out_dir)  # config.json + model.safetensors
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(pretrain_demo_lm(args.out, steps=args.steps))
