"""LoRA on the frozen LM (``model.lm.lora``): its settings and their validation, beside
msmedcap.models.lora. Which modules exist is checked against the LM itself there (``check_lora``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from msmedcap.checks import AT_LEAST_1, POSITIVE, check_bounds
from msmedcap.errors import ConfigError


@dataclass
class LMLoraConfig:
    """Low-rank adapters (peft) beside ``target_modules`` of the LM, trained in stage 2 and merged into
    the LM for inference (docs/lora.md)."""
    r: int = 8  # rank
    alpha: float = 16.0  # peft's lora_alpha: the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input (the frozen LM itself runs without dropout)
    # Names (or name suffixes) of the LM's modules to adapt, peft's list matching; ["all-linear"]: every
    # linear layer but the output head; empty: peft's default for the LM's family (OPT, Llama: q_proj, v_proj).
    target_modules: list = field(default_factory=list)

    def check(self, key: str = "model.lm.lora") -> None:
        check_bounds(self, key, [("r", *AT_LEAST_1), ("alpha", *POSITIVE),
                                 ("dropout", (lambda v: 0 <= v < 1), "in [0, 1)")])
        names = self.target_modules
        if not all(isinstance(t, str) and t.strip() for t in names) or len(set(names)) != len(names):
            raise ConfigError(f"{key}.target_modules must be distinct module names, got {names!r}")
        if "all-linear" in names and len(names) > 1:
            raise ConfigError(f"{key}.target_modules: all-linear must be the only entry, got {names!r}")
