"""The frozen language model's settings (``model.lm``) and their validation, beside
msmedcap.models.captioner. Light: transformers' OPTConfig is imported only to check a bare config."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal, Optional

from msmedcap.checks import AT_LEAST_0, AT_LEAST_1, check_bounds, each, is_int
from msmedcap.errors import ConfigError


@dataclass
class LMConfig:
    # HF name or directory; None = random init from `config`, refused unless model.allow_random_weights
    # (or model.blip2_checkpoint provides the LM)
    name_or_path: Optional[str] = "facebook/opt-2.7b"
    tokenizer: str = "facebook/opt-2.7b"
    config: dict = field(default_factory=dict)  # OPTConfig kwargs for random init (tiny presets)
    prompt: str = "Question: Describe the image. Answer:"
    num_soft_prompts: int = 0  # learned soft prompt embeddings prepended before the queries' projections
    max_caption_len: int = 32
    # The frozen LM's dtype. The stage-2 gradient crosses it, so training runs it in the engine's dtype:
    # auto = train.precision's (written into the run's config.yaml); fp16 only under the fp16 engine,
    # whose dynamic loss scale keeps small gradients. Without an engine (evaluate, caption) auto = frozen_dtype.
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"

    def check(self, num_query_tokens: int, n_branches: int, key: str = "model.lm") -> None:
        """Ranges; the random-init config is OPTConfig keyword arguments, sizes >= 1; the prefix (soft
        prompts, ``num_query_tokens`` per branch) and the caption fit its positions."""
        check_bounds(self, key, each(("max_caption_len",), AT_LEAST_1) + each(("num_soft_prompts",), AT_LEAST_0))
        for k, v in self.config.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}.config: keys must be OPTConfig argument names, got {k!r}")
            if not (v is None or isinstance(v, (str, int, float, bool))):
                raise ConfigError(f"{key}.config.{k} must be a number, string, true/false or null, got {v!r}")
        known = opt_config_keys() if self.config else frozenset()
        unknown = sorted(set(self.config) - known) if known else []
        if unknown:
            raise ConfigError(f"{key}.config.{unknown[0]}: not an OPTConfig argument (e.g. hidden_size, "
                              "num_hidden_layers, num_attention_heads, ffn_dim, max_position_embeddings, vocab_size)")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "max_position_embeddings",
                  "word_embed_proj_dim", "vocab_size"):
            if k in self.config and not (is_int(self.config[k]) and self.config[k] >= 1):
                raise ConfigError(f"{key}.config.{k} must be an integer >= 1, got {self.config[k]!r}")
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


@functools.lru_cache(maxsize=1)
def opt_config_keys() -> frozenset:
    """OPTConfig's argument and attribute names (empty when transformers is not importable)."""
    try:
        import inspect

        from transformers import OPTConfig
    except ImportError:
        return set()
    return frozenset(inspect.signature(OPTConfig.__init__).parameters) | frozenset(vars(OPTConfig()))
