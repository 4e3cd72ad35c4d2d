"""The frozen language model's settings (``model.lm``) and their validation, beside
msmedcap.models.captioner, and which family (msmedcap.models.lm_families) a transformers config belongs to.
Light: transformers is imported only to check a bare config or read an LM directory's config.json."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal, Optional

from msmedcap.checks import AT_LEAST_0, AT_LEAST_1, check_bounds, each, is_int
from msmedcap.errors import ConfigError
from msmedcap.models.lora_settings import LMLoraConfig
from msmedcap.paths import resolve_asset


@dataclass
class LMConfig:
    # HF name or directory of any AutoModelForCausalLM (OPT, GPT-2, Llama, BioGPT, ...) or AutoModelForSeq2SeqLM
    # (T5/Flan-T5) LM (docs/models.md); None = random init from `config`, refused unless
    # model.allow_random_weights (or model.blip2_checkpoint provides the LM)
    name_or_path: Optional[str] = "facebook/opt-2.7b"
    tokenizer: str = "facebook/opt-2.7b"
    # random-init config: model_type (default opt) and that transformers config class's kwargs (tiny presets)
    config: dict = field(default_factory=dict)
    prompt: str = "Question: Describe the image. Answer:"
    chat_template: bool = False  # the prompt as one user turn through the tokenizer's chat template
    # The text that ends each caption and stops generation (one token); None = "\n" for OPT (BLIP-2 OPT's
    # convention), the tokenizer's EOS for every other LM.
    caption_end: Optional[str] = None
    num_soft_prompts: int = 0  # learned soft prompt embeddings prepended before the queries' projections
    max_caption_len: int = 32
    # The frozen LM's dtype. The stage-2 gradient crosses it, so training runs it in the engine's dtype:
    # auto = train.precision's (written into the run's config.yaml); fp16 only under the fp16 engine,
    # whose dynamic loss scale keeps small gradients. Without an engine (evaluate, caption) auto = frozen_dtype.
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    lora: Optional[LMLoraConfig] = None  # LoRA adapters on the LM (models/lora_settings.py); None: none

    def check(self, num_query_tokens: int, n_branches: int, key: str = "model.lm") -> None:
        """Ranges; the random-init config is ``model_type`` (default opt) and its config class's keyword
        arguments, sizes >= 1, of a model type an LM family builds; the prefix (soft prompts,
        ``num_query_tokens`` per branch) and the caption fit its positions."""
        check_bounds(self, key, each(("max_caption_len",), AT_LEAST_1) + each(("num_soft_prompts",), AT_LEAST_0))
        if self.lora is not None:
            self.lora.check(f"{key}.lora")
        for k, v in self.config.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}.config: keys must be config argument names, got {k!r}")
            if not (v is None or isinstance(v, (str, int, float, bool))):
                raise ConfigError(f"{key}.config.{k} must be a number, string, true/false or null, got {v!r}")
        kind = self.config.get("model_type", DEFAULT_MODEL_TYPE)
        known = lm_config_keys(kind) if self.config else frozenset()
        if known is None:
            raise ConfigError(f"{key}.config.model_type must be a transformers model type (opt, gpt2, llama, "
                              f"biogpt, t5, ...), got {kind!r}")
        unknown = sorted(set(self.config) - known - {"model_type"}) if known else []
        if unknown:
            raise ConfigError(f"{key}.config.{unknown[0]}: not an argument of {config_class(kind).__name__} (e.g. "
                              "hidden_size, num_hidden_layers, num_attention_heads, ffn_dim, max_position_embeddings, "
                              "vocab_size)")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "max_position_embeddings",
                  "word_embed_proj_dim", "vocab_size", "intermediate_size", "d_model", "d_ff", "num_layers",
                  "num_heads"):
            if k in self.config and not (is_int(self.config[k]) and self.config[k] >= 1):
                raise ConfigError(f"{key}.config.{k} must be an integer >= 1, got {self.config[k]!r}")
        if self.config and known:  # a model type transformers builds only as a vision or audio model: refused
            bare_config(self)
        hidden, heads = self.config.get("hidden_size"), self.config.get("num_attention_heads")
        if hidden and heads and hidden % heads:
            raise ConfigError(f"{key}.config.hidden_size must be divisible by {key}.config.num_attention_heads "
                              f"({heads}), got {hidden}")
        positions = self.config.get("max_position_embeddings")
        prefix = self.num_soft_prompts + num_query_tokens * n_branches
        if positions and prefix + self.max_caption_len > positions:
            raise ConfigError(f"{key}.num_soft_prompts ({self.num_soft_prompts}) + model.qformer.num_query_tokens "
                              f"({num_query_tokens}) x {n_branches} branch(es) + {key}.max_caption_len "
                              f"({self.max_caption_len}) must be <= {key}.config.max_position_embeddings ({positions}), "
                              f"got {prefix + self.max_caption_len}")


DEFAULT_MODEL_TYPE = "opt"  # a bare model.lm.config without model_type: OPT, as before families existed


def config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


@functools.lru_cache(maxsize=8)
def lm_config_keys(model_type: str):
    """The argument and attribute names of ``model_type``'s transformers config class (empty when transformers
    is not importable, None when it has no such model type)."""
    try:
        import inspect

        from transformers import CONFIG_MAPPING
    except ImportError:
        return frozenset()
    if model_type not in CONFIG_MAPPING:
        return None
    cls = CONFIG_MAPPING[model_type]
    return frozenset(inspect.signature(cls.__init__).parameters) | frozenset(vars(cls())) | frozenset(cls.attribute_map)


def family_name(config, key: str, source: str) -> str:
    """``seq2seq`` (an encoder-decoder that ``AutoModelForSeq2SeqLM`` builds) or ``causal``
    (``AutoModelForCausalLM``) for a transformers config; ConfigError naming ``key`` for any other model type."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", None)
    if kind in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES and getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ConfigError(f"{key} must be a model type transformers builds as AutoModelForCausalLM or "
                      f"AutoModelForSeq2SeqLM (opt, gpt2, llama, mistral, qwen2, biogpt, t5, ...): {source} has "
                      f"model_type {kind!r}")


def bare_config(cfg: LMConfig, tokenizer=None):
    """The transformers config of ``model.lm.config`` (``model_type`` picks the class, OPT without one),
    with the tokenizer's vocabulary and special tokens unless the config gives them; its family checked."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING

    kwargs = dict(cfg.config)
    kind = kwargs.pop("model_type", DEFAULT_MODEL_TYPE)
    if kind not in CONFIG_MAPPING:
        raise ConfigError(f"model.lm.config.model_type must be a transformers model type (opt, gpt2, llama, "
                          f"biogpt, t5, ...), got {kind!r}")
    if tokenizer is not None:
        kwargs = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **kwargs}
    try:
        config = CONFIG_MAPPING[kind](**kwargs)
    except (TypeError, ValueError, StrictDataclassError) as e:  # the config class's own validation
        raise ConfigError(f"model.lm.config: {e}") from e
    if config.is_encoder_decoder and "decoder_start_token_id" not in kwargs and tokenizer is not None:
        config.decoder_start_token_id = tokenizer.pad_token_id  # T5's convention: the decoder starts at pad
    family_name(config, "model.lm.config.model_type", "model.lm.config")
    return config


@functools.lru_cache(maxsize=8)
def pretrained_config(name_or_path: str):
    """The transformers config of an LM directory or hub name, its family checked (ConfigError naming
    ``model.lm.name_or_path``)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_asset(name_or_path))
    except (OSError, ValueError, KeyError) as e:  # no config.json, or a model_type transformers does not know
        raise ConfigError(f"model.lm.name_or_path: {name_or_path} has no config transformers can read: "
                          f"{str(e)[:300]}") from e
    family_name(config, "model.lm.name_or_path", name_or_path)
    return config
