"""The CLIP branch's settings (``model.clip``) and their validation, beside the encoder
(msmedcap.models.encoders.ClipEncoder). Light: reads open_clip's model-config JSON without importing
open_clip, so validation runs before any model code."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from msmedcap.checks import AT_LEAST_1, check_bounds, each
from msmedcap.errors import ConfigError
from msmedcap.paths import resolve_asset


@dataclass
class ClipConfig:
    """open_clip image encoder (frozen). ``name`` is an open_clip model name, or a path to an
    open_clip model-config JSON (tiny presets ship theirs in the package)."""
    name: str = "EVA01-g-14"
    # open_clip pretrained tag or weights file; None = random init, refused unless model.allow_random_weights
    pretrained: Optional[str] = None
    image_size: int = 224
    # Which transformer block's output feeds the Q-Former; -2 = penultimate, as BLIP-2 does.
    feature_layer: int = -2
    # A trainable LayerNorm on the tokens before this branch's Q-Former (BLIP-2's ln_vision).
    ln_vision: bool = True
    # Stage-1 warm start of this branch's Q-Former: LAVIS blip2_pretrained.pth (or any LAVIS Blip2Qformer
    # .pth) or an HF Blip2ForImageTextRetrieval directory (Salesforce/blip2-itm-vit-g); None = off.
    stage1_checkpoint: Optional[str] = None
    # Q-Former tensors left at their initialisation (fnmatch patterns, or `encoder_side`: the tensors whose
    # shape follows the encoder width: ln_vision and the cross-attention keys/values).
    stage1_skip: list = field(default_factory=list)

    def check(self, key: str = "model.clip") -> None:
        """Ranges, and what the open_clip model config says: the image is cut into patch x patch squares;
        the feature layer must exist."""
        check_bounds(self, key, each(("image_size",), AT_LEAST_1))
        vision = open_clip_vision_cfg(self.name)
        if vision is None:
            return
        patch, depth = clip_patch_and_depth(vision)
        if patch and self.image_size % patch:
            raise ConfigError(f"{key}.image_size must be a multiple of {self.name}'s patch size {patch}, "
                              f"got {self.image_size}")
        if depth and not -depth <= self.feature_layer < depth:
            raise ConfigError(f"{key}.feature_layer must be in [-{depth}, {depth - 1}] ({self.name} has "
                              f"{depth} blocks), got {self.feature_layer}")


def open_clip_vision_cfg(name: str) -> Optional[dict]:
    """vision_cfg of an open_clip model config (a JSON path, or a built-in name's packaged JSON),
    read without importing open_clip; None when it cannot be found."""
    try:
        if name.endswith(".json"):
            path = resolve_asset(name)
        else:
            spec = importlib.util.find_spec("open_clip")
            if spec is None or not spec.submodule_search_locations:
                return None
            path = os.path.join(list(spec.submodule_search_locations)[0], "model_configs", f"{name}.json")
        with open(path) as f:
            vision = json.load(f).get("vision_cfg")
        return vision if isinstance(vision, dict) else None
    except (OSError, ValueError):
        return None


def clip_patch_and_depth(vision: dict) -> tuple:
    patch = vision.get("patch_size")
    if patch is None and isinstance(vision.get("timm_model_name"), str):  # e.g. eva_giant_patch14_224
        m = re.search(r"patch(\d+)", vision["timm_model_name"])
        patch = int(m.group(1)) if m else None
    depth = vision.get("layers") if isinstance(vision.get("layers"), int) else None
    return (patch if isinstance(patch, int) and patch > 0 else None), depth
