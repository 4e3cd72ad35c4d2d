"""Stage 2: the frozen OPT captioner fed with the Q-Formers' query outputs.

LM input = [soft prompts | CLIP queries | SAM queries | prompt | caption], each branch's queries
through its own Linear into OPT's embedding space (BLIP-2's ``language_projection``). The loss is on
caption tokens only; captions end with "\\n", which is also generation's EOS, as in BLIP-2 OPT.
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationConfig, OPTConfig, OPTForCausalLM
from transformers.cache_utils import DynamicLayer

from msmedcap.batch import CAPTION_EOS
from msmedcap.config import ConfigError, LMConfig, resolve_asset
from msmedcap.models.encoders import built_in, fixed_seed, weights_mismatch

log = logging.getLogger(__name__)


def load_opt(name_or_path: str, dtype: torch.dtype) -> OPTForCausalLM:
    """``OPTForCausalLM.from_pretrained`` in ``dtype`` (transformers builds it on the meta device and loads
    each tensor cast), refused unless the directory provides every tensor of the OPT its config describes:
    transformers itself only reports missing or unexpected tensors and leaves them random."""
    path = resolve_asset(name_or_path)
    try:
        lm, info = OPTForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (RuntimeError, ValueError) as e:  # e.g. tensors of another shape
        raise ConfigError(f"model.lm.name_or_path: {name_or_path} does not load as OPT: {str(e)[:500]}") from e
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = [f"{k[0]} {tuple(k[1])} vs {tuple(k[2])}" if isinstance(k, tuple) and len(k) == 3 else str(k)
                  for k in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        kind = getattr(lm.config, "model_type", "opt")
        raise weights_mismatch("model.lm.name_or_path", name_or_path, "OPTForCausalLM"
                               + (f" (its config says model_type {kind!r})" if kind != "opt" else ""),
                               missing, unexpected, mismatched)
    return lm


def build_opt(cfg: LMConfig, tokenizer, dtype: torch.dtype) -> OPTForCausalLM:
    """OPT from ``name_or_path`` (its own weights and vocabulary) or random init from ``cfg.config``
    (:func:`lm_config`), built in ``dtype`` (no fp32 copy)."""
    if cfg.name_or_path:
        lm = load_opt(cfg.name_or_path, dtype)
    else:
        config = lm_config(cfg, tokenizer)
        try:
            with built_in(dtype):
                lm = OPTForCausalLM(config)
        except TypeError as e:  # a config value the model cannot be built with
            raise ConfigError(f"model.lm.config: {e}") from e
    if len(tokenizer) > lm.config.vocab_size:
        raise ConfigError(f"model.lm.tokenizer has {len(tokenizer)} tokens, more than the LM's vocabulary "
                          f"({lm.config.vocab_size})")
    return lm


def lm_config(cfg: LMConfig, tokenizer) -> OPTConfig:
    """The LM's architecture without building it: ``name_or_path``'s config, or ``cfg.config`` with the
    tokenizer's vocabulary and special tokens (vocabulary = ``config.vocab_size`` or the tokenizer's length)."""
    if cfg.name_or_path:
        return OPTConfig.from_pretrained(resolve_asset(cfg.name_or_path))
    kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **cfg.config}
    try:
        return OPTConfig(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model.lm.config: {e}") from e


def _repeated_rows(t: torch.Tensor, n: int):
    """``t[::n]`` if ``t``'s rows come in runs of ``n`` equal rows (``repeat_interleave(n)`` of it), else None."""
    if t.shape[0] % n:
        return None
    once = t[::n]
    return once if torch.equal(once.repeat_interleave(n, dim=0), t) else None


@contextmanager
def prefill_once_per_sample(lm: nn.Module, num_beams: int):
    """Beam search's prefill (the LM over the prefix) computed once per sample instead of once per
    beam. transformers expands ``inputs_embeds`` to ``batch x num_beams`` equal rows before its first
    forward; during ``lm.generate`` that first forward runs here on every ``num_beams``-th row, and its
    logits and (empty before, dynamic) cache are repeated ``num_beams`` times: what the expanded
    forward computes, as each row's outputs depend on that row alone (equal bit for bit on this CPU:
    tests/test_eval_generate.py compares every step's beam scores). 4.2 -> 2.1 ms per batch-8 call of
    the demo model, 1.6 -> 1.3 ms at batch 1. Anything else (no prefix embeddings, rows that are not
    exact repeats, another cache type, later steps) goes to the LM's own forward unchanged."""
    if num_beams <= 1:
        yield
        return
    forward = lm.forward
    done = False

    @functools.wraps(forward)  # transformers inspects the forward's signature
    def first_forward(*args, **kwargs):
        nonlocal done
        embeds, cache = kwargs.get("inputs_embeds"), kwargs.get("cache", kwargs.get("past_key_values"))
        if done or args or embeds is None or type(cache) is not DynamicCache or cache.get_seq_length() \
                or any(type(layer) is not DynamicLayer for layer in cache.layers):
            done = True
            return forward(*args, **kwargs)
        done = True
        rows = embeds.shape[0]
        once = {}
        for k, v in kwargs.items():
            if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == rows:
                once[k] = _repeated_rows(v, num_beams)
                if once[k] is None:
                    return forward(*args, **kwargs)
        out = forward(**{**kwargs, **once})
        cache.batch_repeat_interleave(num_beams)
        out.logits = out.logits.repeat_interleave(num_beams, dim=0)
        return out

    lm.forward = first_forward
    try:
        yield
    finally:
        del lm.forward  # the class's forward again
        if lm.forward != forward:  # an instance-level forward was there before: put it back
            lm.forward = forward


class Captioner(nn.Module):
    """The projections and soft prompts (trainable) and the frozen LM. ``with_lm=False`` (stage 1, which
    never runs the LM) leaves ``lm`` None: the trainables come out the same, the LM's weights are never
    built or loaded."""

    def __init__(self, cfg: LMConfig, query_widths: dict, tokenizer, dtype: torch.dtype, with_lm: bool = True):
        super().__init__()
        self.tokenizer = tokenizer
        self.lm = None
        if with_lm:
            with fixed_seed():
                self.lm = build_opt(cfg, tokenizer, dtype)
            self.lm.requires_grad_(False)
            self.lm.eval()
        config = self.lm.config if with_lm else lm_config(cfg, tokenizer)
        width = config.word_embed_proj_dim  # OPT's input embedding width
        self.projections = nn.ModuleDict({b: nn.Linear(w, width) for b, w in query_widths.items()})
        self.soft_prompts = nn.Parameter(torch.randn(cfg.num_soft_prompts, width) * config.init_std)
        eos = tokenizer(CAPTION_EOS, add_special_tokens=False).input_ids
        if len(eos) != 1:
            raise ConfigError(f"model.lm.tokenizer: {CAPTION_EOS!r} must be one token, got {eos}")
        self.eos_token_id = eos[0]
        prompt = tokenizer(cfg.prompt, add_special_tokens=True).input_ids  # bos + prompt, as BLIP-2 OPT
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)

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
        prefix = self.prefix(query_outputs)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        # only the positions that predict caption tokens go through the (vocabulary-sized) LM head; no
        # cache: nothing reads it, and a checkpointed layer's recompute would write it twice
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=input_ids.shape[1] + 1,
                      use_cache=False)
        return out.logits[:, :-1]

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
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        with prefill_once_per_sample(self.lm, num_beams):
            out = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
