"""The captioner's language model, per family: which transformers class builds it, where the prefix (soft
prompts, projected queries, prompt) goes, the caption's end token, how it prefills and generates.

Two families cover the LMs transformers' Auto classes build:

- ``causal`` (``AutoModelForCausalLM``: OPT, GPT-2, Llama/Mistral/Qwen, BioGPT, ...): the prefix starts
  the LM's input and the caption follows it; beam search prefills once per sample
  (:func:`prefill_once_per_sample`).
- ``seq2seq`` (``AutoModelForSeq2SeqLM``: T5/Flan-T5, ...): the prefix is the encoder's input and the
  caption the decoder's, as BLIP-2 T5 (LAVIS ``blip2_t5``, transformers' ``Blip2ForConditionalGeneration``).
  transformers runs the encoder once per sample before beam search, so there is no prefill to share.

Input embeddings are the LM's own ``get_input_embeddings()`` (BioGPT's scale included). Every row's prefix
has the same length, so no family needs left padding: captions are right-padded, after the prefix or in
the decoder. The caption ends with OPT's "\\n" for OPT (BLIP-2 OPT's convention), with the tokenizer's EOS
for every other model, or with ``model.lm.caption_end`` when set.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from msmedcap.batch import CAPTION_EOS
from msmedcap.errors import ConfigError
from msmedcap.models.encoders import built_in, weights_mismatch
from msmedcap.models.lm_settings import (DEFAULT_MODEL_TYPE, LMConfig, bare_config, family_name,
                                         pretrained_config)
from msmedcap.paths import resolve_asset


# --------------------------------------------------------------------------- generation helpers
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
    tests/integration/test_eval_generate.py compares every step's beam scores). 4.2 -> 2.1 ms per batch-8 call of
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


# --------------------------------------------------------------------------- families
class CausalLM:
    """Decoder-only: one sequence ``[prefix | caption]``."""
    name = "causal"
    auto_class = "AutoModelForCausalLM"

    @staticmethod
    def caption_logits(lm, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        embeds = torch.cat([prefix, lm.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        # only the positions that predict caption tokens go through the (vocabulary-sized) LM head; no
        # cache: nothing reads it, and a checkpointed layer's recompute would write it twice
        out = lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=input_ids.shape[1] + 1, use_cache=False)
        return out.logits[:, -input_ids.shape[1] - 1:-1]

    @staticmethod
    def generate(lm, prefix: torch.Tensor, mask: torch.Tensor, config) -> torch.Tensor:
        with prefill_once_per_sample(lm, config.num_beams):
            return lm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)


class Seq2SeqLM:
    """Encoder-decoder: the prefix is the encoder's input, the caption the decoder's (BLIP-2 T5)."""
    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"

    @staticmethod
    def caption_logits(lm, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # the decoder reads [start | caption[:-1]] (the model's own shift); its right padding only reaches
        # pad positions, which the loss ignores
        decoder_ids = lm.prepare_decoder_input_ids_from_labels(labels=input_ids)
        out = lm(inputs_embeds=prefix, attention_mask=attention_mask.new_ones(prefix.shape[:2]),
                 decoder_input_ids=decoder_ids, use_cache=False)
        return out.logits

    @staticmethod
    def generate(lm, prefix: torch.Tensor, mask: torch.Tensor, config) -> torch.Tensor:
        return lm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)


FAMILIES = {f.name: f for f in (CausalLM, Seq2SeqLM)}


def family_of(config, key: str, source: str):
    """The family of a transformers config (ConfigError naming ``key`` when no LM family builds it)."""
    return FAMILIES[family_name(config, key, source)]


def lm_config(cfg: LMConfig, tokenizer=None):
    """The LM's architecture without building it: ``name_or_path``'s config, or ``model.lm.config``'s."""
    if cfg.name_or_path:
        return pretrained_config(cfg.name_or_path)
    return bare_config(cfg, tokenizer)


def load_lm(name_or_path: str, dtype: torch.dtype) -> nn.Module:
    """The LM of ``name_or_path`` through its family's Auto class, in ``dtype`` (transformers builds it on
    the meta device and loads each tensor cast), refused unless the directory provides every tensor of the
    model its config describes: transformers itself only reports missing or unexpected tensors and leaves
    them random."""
    import transformers

    config = pretrained_config(name_or_path)
    family = family_of(config, "model.lm.name_or_path", name_or_path)
    cls = getattr(transformers, family.auto_class)
    try:
        lm, info = cls.from_pretrained(resolve_asset(name_or_path), dtype=dtype, output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as e:  # e.g. tensors of another shape, no weights file
        raise ConfigError(f"model.lm.name_or_path: {name_or_path} does not load as {config.model_type}: "
                          f"{str(e)[:500]}") from e
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = [f"{k[0]} {tuple(k[1])} vs {tuple(k[2])}" if isinstance(k, tuple) and len(k) == 3 else str(k)
                  for k in info.get("mismatched_keys", ())]
    if missing or unexpected or mismatched:
        raise weights_mismatch("model.lm.name_or_path", name_or_path,
                               f"{type(lm).__name__} (its config says model_type {config.model_type!r})",
                               missing, unexpected, mismatched)
    return lm


def build_lm(cfg: LMConfig, tokenizer, dtype: torch.dtype) -> nn.Module:
    """The LM from ``name_or_path`` (its own weights and vocabulary) or random init from ``cfg.config``
    (:func:`bare_config`), built in ``dtype`` (no fp32 copy)."""
    import transformers

    if cfg.name_or_path:
        lm = load_lm(cfg.name_or_path, dtype)
    else:
        config = bare_config(cfg, tokenizer)
        cls = getattr(transformers, family_of(config, "model.lm.config.model_type", "model.lm.config").auto_class)
        try:
            with built_in(dtype):
                lm = cls.from_config(config)
        except (TypeError, ValueError) as e:  # a config value the model cannot be built with
            raise ConfigError(f"model.lm.config: {e}") from e
    if len(tokenizer) > lm.config.get_text_config().vocab_size:
        raise ConfigError(f"model.lm.tokenizer has {len(tokenizer)} tokens, more than the LM's vocabulary "
                          f"({lm.config.get_text_config().vocab_size})")
    return lm


def input_width(config) -> int:
    """Width of the LM's input embeddings (OPT's ``word_embed_proj_dim`` may differ from its hidden size)."""
    if config.model_type == "opt":
        return config.word_embed_proj_dim
    return config.get_text_config().hidden_size


def init_std(config) -> float:
    """The std the LM's own initialisation uses (the soft prompts start at its scale)."""
    for name in ("init_std", "initializer_range"):
        if isinstance(getattr(config, name, None), float):
            return getattr(config, name)
    return 0.02


# --------------------------------------------------------------------------- caption end and prompt
@functools.lru_cache(maxsize=8)
def _model_type(name_or_path: Optional[str], bare_type: Optional[str], blip2_checkpoint: Optional[str]) -> str:
    if name_or_path:
        return pretrained_config(name_or_path).model_type
    if bare_type:
        return bare_type
    if blip2_checkpoint:
        from transformers import Blip2Config

        return Blip2Config.from_pretrained(resolve_asset(blip2_checkpoint)).text_config.model_type
    return DEFAULT_MODEL_TYPE


def model_type(m) -> str:
    """The LM's ``model_type`` without building it (as :func:`msmedcap.models.loading.build_model` builds it)."""
    return _model_type(m.lm.name_or_path, m.lm.config.get("model_type"), m.blip2_checkpoint)


def caption_end(m, tokenizer) -> str:
    """The text that ends every caption (training targets) and stops generation: ``model.lm.caption_end``,
    else "\\n" for OPT (BLIP-2 OPT) and the tokenizer's EOS for every other LM. One token, checked."""
    end = m.lm.caption_end
    if end is None:
        end = CAPTION_EOS if model_type(m) == "opt" else tokenizer.eos_token
    if not end:
        raise ConfigError(f"model.lm.caption_end: the tokenizer {m.lm.tokenizer} has no EOS token; set the text "
                          "that ends a caption")
    ids = tokenizer(end, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConfigError(f"model.lm.caption_end: {end!r} must be one token of {m.lm.tokenizer}, got {ids}")
    return end


def prompt_ids(cfg: LMConfig, tokenizer) -> list:
    """The prompt's token ids: the tokenizer's special tokens around it (bos + prompt, as BLIP-2 OPT; prompt
    + </s> for T5), or with ``model.lm.chat_template`` the tokenizer's chat template of one user turn and
    the assistant's generation prompt."""
    if not cfg.chat_template:
        return list(tokenizer(cfg.prompt, add_special_tokens=True).input_ids)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.lm.chat_template: the tokenizer {cfg.tokenizer} has no chat template")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
