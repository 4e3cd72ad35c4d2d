"""Stage 1's objective settings (``model.stage1``) and their validation, beside msmedcap.models.stage1."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from msmedcap.checks import check_bounds
from msmedcap.errors import ConfigError

HEADS = ("itc", "itm", "itg")


@dataclass
class CounterfactualsConfig:
    """Captions with one finding changed as ITM's hard negatives (msmedcap.models.counterfactuals)."""
    enabled: bool = False
    # {name: [term, ...] or [[term, ...], ...]}: interchangeable terms; null = RADIOLOGY_SETS (English radiology)
    sets: Optional[dict] = None
    use: list = field(default_factory=list)  # the set names used; empty = all
    # Share of ITM's (image, other text) negatives replaced by the image's own counterfactual, where its
    # caption has one.
    itm_share: float = 0.5
    # Also score each image against the counterfactuals of its branch's captions as extra ITC text negatives.
    itc: bool = False

    @property
    def term_sets(self) -> dict:
        """``sets``, or the built-in RADIOLOGY_SETS when it is null."""
        from msmedcap.models.counterfactuals import RADIOLOGY_SETS

        return self.sets or RADIOLOGY_SETS

    def maker(self, use=None):
        """The generator of the sets named by ``use`` (default: this section's ``use``), on or off."""
        from msmedcap.models.counterfactuals import Counterfactuals

        return Counterfactuals(self.term_sets, self.use if use is None else use)

    def build(self):
        """The generator of these settings (None when off)."""
        return self.maker() if self.enabled else None

    def check(self, key: str) -> None:
        check_bounds(self, key, [("itm_share", (lambda v: 0 <= v <= 1), "in [0, 1]")])
        if not all(isinstance(u, str) for u in self.use):
            raise ConfigError(f"{key}.use: expected a list of set names, got {self.use!r}")
        try:
            self.maker()
        except ValueError as e:
            raise ConfigError(str(e).replace("model.stage1.counterfactuals", key)) from None


@dataclass
class Stage1Config:
    counterfactuals: CounterfactualsConfig = field(default_factory=CounterfactualsConfig)
    # ITM's mined negatives skip samples whose caption is the positive's (a duplicate caption describes
    # the image as well as its own: BLIP-2 draws it as a negative all the same).
    negatives_skip_same_text: bool = False
    # Each head's weight in stage 1's loss (the logged losses are unweighted); BLIP-2 sums them, all 1.
    loss_weights: dict = field(default_factory=lambda: {"itc": 1.0, "itm": 1.0, "itg": 1.0})

    def check(self, key: str = "model.stage1") -> None:
        self.counterfactuals.check(f"{key}.counterfactuals")
        for head, w in self.loss_weights.items():
            if head not in HEADS:
                raise ConfigError(f"{key}.loss_weights: unknown head {head!r} ({', '.join(HEADS)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ConfigError(f"{key}.loss_weights.{head} must be a number >= 0, got {w!r}")

    def weight(self, head: str) -> float:
        return float(self.loss_weights.get(head, 1.0))
