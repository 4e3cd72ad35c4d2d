"""Stage 2: the frozen OPT captioner fed with the Q-Formers' query outputs.

LM input = [soft prompts | CLIP queries | SAM queries | prompt | caption], each branch's queries
through its own Linear into OPT's embedding space (BLIP-2's ``language_projection``). The loss is on
caption tokens only; captions end with "\\n", which is also generation's EOS, as in BLIP-2 OPT.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, OPTConfig, OPTForCausalLM

from msmedcap.batch import CAPTION_EOS
from msmedcap.config import ConfigError, LMConfig, resolve_asset
from msmedcap.models.encoders import fixed_seed

log = logging.getLogger(__name__)


def build_opt(cfg: LMConfig, tokenizer, dtype: torch.dtype) -> OPTForCausalLM:
    """OPT from ``name_or_path`` (its own weights and vocabulary) or random init from ``cfg.config``
    (vocabulary = ``config.vocab_size`` or the tokenizer's length)."""
    if cfg.name_or_path:
        lm = OPTForCausalLM.from_pretrained(resolve_asset(cfg.name_or_path), dtype=dtype)
    else:
        kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **cfg.config}
        try:
            lm = OPTForCausalLM(OPTConfig(**kwargs)).to(dtype)
        except TypeError as e:
            raise ConfigError(f"model.lm.config: {e}") from e
    if len(tokenizer) > lm.config.vocab_size:
        raise ConfigError(f"model.lm.tokenizer has {len(tokenizer)} tokens, more than the LM's vocabulary "
                          f"({lm.config.vocab_size})")
    return lm


class Captioner(nn.Module):
    def __init__(self, cfg: LMConfig, query_widths: dict, tokenizer, dtype: torch.dtype):
        super().__init__()
        self.tokenizer = tokenizer
        with fixed_seed():
            self.lm = build_opt(cfg, tokenizer, dtype)
        self.lm.requires_grad_(False)
        self.lm.eval()
        width = self.lm.get_input_embeddings().embedding_dim
        self.projections = nn.ModuleDict({b: nn.Linear(w, width) for b, w in query_widths.items()})
        self.soft_prompts = nn.Parameter(torch.randn(cfg.num_soft_prompts, width) * self.lm.config.init_std)
        eos = tokenizer(CAPTION_EOS, add_special_tokens=False).input_ids
        if len(eos) != 1:
            raise ConfigError(f"model.lm.tokenizer: {CAPTION_EOS!r} must be one token, got {eos}")
        self.eos_token_id = eos[0]
        prompt = tokenizer(cfg.prompt, add_special_tokens=True).input_ids  # bos + prompt, as BLIP-2 OPT
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
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
        prefix = self.prefix(query_outputs)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        # only the positions that predict caption tokens go through the (vocabulary-sized) LM head
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=input_ids.shape[1] + 1)
        return out.logits[:, :-1]

    def loss(self, query_outputs: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
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
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        out = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
