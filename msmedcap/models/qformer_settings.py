"""The Q-Formers' settings (``model.qformer``) and their validation, beside msmedcap.models.qformer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from msmedcap.checks import AT_LEAST_1, check_bounds, each
from msmedcap.errors import ConfigError


@dataclass
class QFormerConfig:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    embed_dim: int = 256  # ITC projection size
    max_text_len: int = 32
    tokenizer: str = "bert-base-uncased"  # HF name or directory
    init_from: Optional[str] = None  # BERT weights (HF name or directory) for the Q-Former layers
    # Std of the cross-attention query/key weights at initialisation; None = BERT's 0.02, as BLIP-2.
    # Tiny Q-Formers need more: at the demo's widths 0.02 gives attention logits of ~0.02, i.e. uniform
    # over the image tokens, and the queries never learn to single out a small lesion in the demo's budget.
    cross_attention_init: Optional[float] = None

    def check(self, key: str = "model.qformer") -> None:
        check_bounds(self, key, each(("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                      "cross_attention_freq", "num_query_tokens", "embed_dim"), AT_LEAST_1) + [
            ("cross_attention_init", (lambda v: v is None or v > 0), "> 0 or null (BERT's 0.02)"),
            ("max_text_len", (lambda v: 2 <= v <= 512), "in 2..512 ([CLS] and [SEP]; the Q-Former's 512 positions)")])
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{key}.hidden_size must be divisible by {key}.num_heads")
