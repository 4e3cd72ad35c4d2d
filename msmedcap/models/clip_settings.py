"""The CLIP branch's settings (``model.clip``) and their validation, beside the encoder
(msmedcap.models.encoders.ClipEncoder). Light: reads open_clip's model-config JSON without importing
open_clip, so validation runs before any model code."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from msmedcap.checks import AT_LEAST_0, AT_LEAST_1, check_bounds, each
from msmedcap.data.clip_preprocess import has_schema, model_image_size  # light: open_clip only inside its functions
from msmedcap.errors import ConfigError
from msmedcap.paths import resolve_asset


@dataclass
class ClipConfig:
    """open_clip image encoder (frozen). ``name`` is an open_clip model name, a path to an open_clip
    model-config JSON (tiny presets ship theirs in the package), or ``hf-hub:org/repo`` /
    ``local-dir:/path`` (config, preprocessing and weights from the repository or folder; offline from a
    local copy). The image preprocessing is the model's own (open_clip's preprocess config: docs/encoders.md)."""
    name: str = "EVA01-g-14"
    # open_clip pretrained tag or weights file; None = random init, refused unless model.allow_random_weights.
    # Not with an hf-hub:/local-dir: name (its weights come with it; open_clip would ignore this).
    pretrained: Optional[str] = None
    # The tower's input side; null = the model's own (its open_clip config's vision_cfg.image_size, as open_clip
    # builds it without force_image_size), filled in when the config is checked.
    image_size: Optional[int] = 224
    # Which transformer block's output feeds the Q-Former; -2 = penultimate, as BLIP-2 does.
    feature_layer: int = -2
    # A trainable LayerNorm on the tokens before this branch's Q-Former (BLIP-2's ln_vision).
    ln_vision: bool = True
    # A trainable residual MLP on each token before the Q-Former's ln_vision (hidden: this many times the
    # token width; 0 = none, as BLIP-2). docs/model.md
    token_mlp: int = 0
    # Stage-1 warm start of this branch's Q-Former: LAVIS blip2_pretrained.pth (or any LAVIS Blip2Qformer
    # .pth) or an HF Blip2ForImageTextRetrieval directory (Salesforce/blip2-itm-vit-g); None = off.
    stage1_checkpoint: Optional[str] = None
    # Q-Former tensors left at their initialisation (fnmatch patterns, or `encoder_side`: the tensors whose
    # shape follows the encoder width: ln_vision and the cross-attention keys/values).
    stage1_skip: list = field(default_factory=list)

    def check(self, key: str = "model.clip") -> None:
        """Ranges, and what the open_clip model config says: the image is cut into patch x patch squares;
        the feature layer must exist. An ``hf-hub:``/``local-dir:`` name brings its weights: no ``pretrained``."""
        if self.image_size is None:
            self.image_size = model_image_size(self.name)
        check_bounds(self, key, each(("image_size",), AT_LEAST_1) + each(("token_mlp",), AT_LEAST_0))
        if has_schema(self.name):
            if self.pretrained:
                raise ConfigError(f"{key}.pretrained: not with {key}.name={self.name} (its weights come with the "
                                  "name; open_clip ignores pretrained there); unset it")
            if self.name.startswith("local-dir:") and not os.path.isdir(self.name[len("local-dir:"):]):
                raise ConfigError(f"{key}.name: folder not found: {self.name[len('local-dir:'):]}")
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


    def missing_weights(self) -> Optional[tuple]:
        """(key, what to set it to) when this tower would be random, else None: no ``pretrained`` for a
        built-in name or JSON, a ``local-dir:`` folder without a weights file (``hf-hub:`` names bring theirs)."""
        if self.name.startswith("local-dir:"):
            folder = self.name[len("local-dir:"):]
            if any(glob.glob(os.path.join(folder, f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
                return None  # what open_clip's local-dir loader takes as weights (factory._find_checkpoint_in_dir)
            return ("model.clip.name", f"a folder with open_clip weights (open_clip_model.safetensors, ...) beside "
                                       f"its open_clip_config.json; {folder} has none")
        if has_schema(self.name) or self.pretrained:
            return None
        return ("model.clip.pretrained", f"an open_clip pretrained tag of {self.name} (EVA01-g-14: "
                                         "laion400m_s11b_b41k) or a weights file")


def open_clip_vision_cfg(name: str) -> Optional[dict]:
    """vision_cfg of an open_clip model config (a JSON path, a built-in name's packaged JSON, a ``local-dir:``
    folder's open_clip_config.json), read without importing open_clip; None when it cannot be found (and for
    ``hf-hub:`` names: read through huggingface_hub when the preprocessing is resolved)."""
    try:
        if name.startswith("local-dir:"):
            with open(os.path.join(name[len("local-dir:"):], "open_clip_config.json")) as f:
                vision = (json.load(f).get("model_cfg") or {}).get("vision_cfg")
            return vision if isinstance(vision, dict) else None
        if name.startswith("hf-hub:"):
            return None
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
