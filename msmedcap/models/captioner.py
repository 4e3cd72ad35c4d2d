"""Stage 2: the frozen LM captioner fed with the Q-Formers' query outputs.

Prefix = [soft prompts | CLIP queries | SAM queries | prompt], each branch's queries through its own Linear
into the LM's embedding space (BLIP-2's ``language_projection``); the caption follows it (causal LMs) or is
the decoder's (T5), as msmedcap.models.lm_families says per family. The loss is on caption tokens only;
captions end with the family's end token (OPT: "\n", as BLIP-2 OPT), which is also generation's EOS.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from msmedcap.models.lm_settings import LMConfig
from msmedcap.models.encoders import fixed_seed
from msmedcap.models.lm_families import build_lm, family_of, init_std, input_width, lm_config, prompt_ids

log = logging.getLogger(__name__)


class Captioner(nn.Module):
    """The projections and soft prompts (trainable) and the frozen LM. ``with_lm=False`` (stage 1, which
    never runs the LM) leaves ``lm`` None: the trainables come out the same, the LM's weights are never
    built or loaded."""

    def __init__(self, cfg: LMConfig, query_widths: dict, tokenizer, dtype: torch.dtype, caption_end: str,
                 with_lm: bool = True):
        """``caption_end``: the text ending every caption (lm_families.caption_end)."""
        super().__init__()
        self.tokenizer = tokenizer
        self.lm = None
        if with_lm:
            with fixed_seed():
                self.lm = build_lm(cfg, tokenizer, dtype)
            self.lm.requires_grad_(False)
            self.lm.eval()
        config = self.lm.config if with_lm else lm_config(cfg, tokenizer)
        self.family = family_of(config, "model.lm", "the LM")
        width = input_width(config)
        self.projections = nn.ModuleDict({b: nn.Linear(w, width) for b, w in query_widths.items()})
        self.soft_prompts = nn.Parameter(torch.randn(cfg.num_soft_prompts, width) * init_std(config))
        self.eos_token_id = tokenizer(caption_end, add_special_tokens=False).input_ids[0]
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids(cfg, tokenizer), dtype=torch.long),
                             persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lm is not None:
            self.lm.eval()  # frozen: no dropout
        return self

    def prefix(self, query_outputs: dict) -> torch.Tensor:
        """``[B, K, D]`` embeddings before the caption: soft prompts, projected queries, prompt."""
        embed = self.lm.get_input_embeddings()
        b = next(iter(query_outputs.values())).shape[0]
        parts = [self.soft_prompts.expand(b, -1, -1)]
        for name, proj in self.projections.items():  # config order: clip before sam
            parts.append(proj(query_outputs[name].to(proj.weight.dtype)))
        parts.append(embed(self.prompt_ids).expand(b, -1, -1))
        return torch.cat([p.to(embed.weight.dtype) for p in parts], dim=1)

    def logits(self, query_outputs: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits for the caption positions: ``logits[:, i]`` predicts ``input_ids[:, i]``."""
        return self.family.caption_logits(self.lm, self.prefix(query_outputs), input_ids, attention_mask)

    def loss(self, query_outputs: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE over the caption tokens. The LM runs on the positions up to the batch's last
        real caption token (pad columns beyond it dropped: the loader already pads to the longest)."""
        width = int((attention_mask.bool().any(0) * torch.arange(1, attention_mask.shape[1] + 1,
                                                                  device=attention_mask.device)).max())
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        logits = self.logits(query_outputs, input_ids, attention_mask)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, query_outputs: dict, num_beams: int = 5, min_len: int = 8, max_len: int = 30,
                 repetition_penalty: float = 1.0, length_penalty: float = 1.0) -> list:
        prefix = self.prefix(query_outputs)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        tok = self.tokenizer
        config = GenerationConfig(
            do_sample=False, num_beams=num_beams, min_new_tokens=min_len, max_new_tokens=max_len,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty, eos_token_id=self.eos_token_id,
            pad_token_id=self.eos_token_id if tok.pad_token_id is None else tok.pad_token_id,
            bos_token_id=tok.bos_token_id, decoder_start_token_id=getattr(self.lm.config, "decoder_start_token_id", None))
        out = self.family.generate(self.lm, prefix, mask, config)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
