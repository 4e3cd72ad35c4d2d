"""The SAM branch's settings (``model.sam``) and their validation, beside the encoder
(msmedcap.models.encoders.SamEncoder). Light: no segment-anything import."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal, Optional

from msmedcap.checks import AT_LEAST_0, AT_LEAST_1, check_bounds, each, is_int
from msmedcap.errors import ConfigError

# ImageEncoderViT kwargs model.sam.encoder may set for type tiny (build_sam_tiny passes the rest) and
# the patch size it uses when none is given (msmedcap.models.encoders.TINY_SAM_DEFAULTS).
SAM_ENCODER_KEYS = {"embed_dim": int, "depth": int, "num_heads": int, "patch_size": int, "out_chans": int,
                    "window_size": int, "global_attn_indexes": list, "use_abs_pos": bool, "rel_pos_zero_init": bool}
TINY_SAM_PATCH = 16
SAM_REGISTRY_IMAGE_SIZE = 1024  # vit_b/l/h as segment-anything builds them
# What a frozen part without weights needs, by key: the files users download (README, "The paper preset").
SAM_CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}


@dataclass
class SamConfig:
    """segment-anything image encoder (frozen)."""
    type: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "vit_b"
    # SAM .pth (full model or image encoder only; vit_b: sam_vit_b_01ec64.pth from segment-anything's README);
    # None = random init, refused unless model.allow_random_weights
    checkpoint: Optional[str] = None
    image_size: int = 1024
    token_layout: Literal["channels", "spatial"] = "channels"
    # The image preprocessing the weights expect: `sam` (ResizeLongestSide, SAM mean/std, zero pad) or `medsam`
    # (MedSAM's: squash to image_size x image_size, [0, 1] min-max per image, no mean/std). docs/encoders.md
    preprocess: Literal["sam", "medsam"] = "sam"
    # ImageEncoderViT kwargs overriding the registry type (tiny presets); empty = the registry's.
    encoder: dict = field(default_factory=dict)
    # Images per SAM encoder call (the batch runs in chunks of this many, outputs concatenated); 0 = all.
    encoder_chunk: int = 0
    # As model.clip.*: the reference code (MSMedCap) cross-attends SAM's neck output with no LayerNorm.
    ln_vision: bool = True
    # A trainable residual MLP on each token before the Q-Former's ln_vision (hidden: this many times the
    # token width; 0 = none, as BLIP-2). docs/model.md
    token_mlp: int = 0
    stage1_checkpoint: Optional[str] = None
    stage1_skip: list = field(default_factory=list)

    def check(self, key: str = "model.sam") -> None:
        """Ranges; the registry's types are fixed (image size, no encoder overrides); tiny takes
        ImageEncoderViT kwargs."""
        check_bounds(self, key, each(("image_size",), AT_LEAST_1) + each(("encoder_chunk", "token_mlp"), AT_LEAST_0))
        if self.preprocess == "medsam" and importlib.util.find_spec("skimage") is None:
            raise ConfigError(f"{key}.preprocess=medsam resizes with scikit-image, as MedSAM does: "
                              "pip install 'msmedcap[medsam]' (or scikit-image)")
        if self.type != "tiny":
            if self.encoder:
                raise ConfigError(f"{key}.encoder must be empty for {key}.type={self.type} (overrides are for "
                                  f"type tiny), got {self.encoder!r}")
            if self.image_size != SAM_REGISTRY_IMAGE_SIZE:
                raise ConfigError(f"{key}.image_size must be {SAM_REGISTRY_IMAGE_SIZE} for {key}.type={self.type}, "
                                  f"got {self.image_size}")
            return
        for k, v in self.encoder.items():
            want = SAM_ENCODER_KEYS.get(k)
            if want is None:
                raise ConfigError(f"{key}.encoder.{k}: unknown key (allowed: {', '.join(sorted(SAM_ENCODER_KEYS))})")
            if want is int and not (is_int(v) and (v >= 1 or (k == "window_size" and v >= 0))):
                raise ConfigError(f"{key}.encoder.{k} must be an integer >= {0 if k == 'window_size' else 1}, "
                                  f"got {v!r}")
            if want is bool and not isinstance(v, bool):
                raise ConfigError(f"{key}.encoder.{k} must be true/false, got {v!r}")
        enc = self.encoder
        depth = enc.get("depth", 2)
        gai = enc.get("global_attn_indexes", [1])
        if not (isinstance(gai, list) and all(is_int(i) and 0 <= i < depth for i in gai)):
            raise ConfigError(f"{key}.encoder.global_attn_indexes must be a list of block indexes in "
                              f"[0, {depth - 1}] (depth {depth}), got {gai!r}")
        dim, heads = enc.get("embed_dim", 64), enc.get("num_heads", 2)
        if dim % heads:
            raise ConfigError(f"{key}.encoder.embed_dim must be divisible by {key}.encoder.num_heads "
                              f"({heads}), got {dim}")
        patch = enc.get("patch_size", TINY_SAM_PATCH)
        if self.image_size % patch:
            raise ConfigError(f"{key}.image_size must be a multiple of the SAM patch size {patch} "
                              f"({key}.encoder.patch_size), got {self.image_size}")

    def missing_weights(self) -> Optional[tuple]:
        """(key, what to set it to) when this encoder would be random, else None (as ClipConfig's)."""
        if self.checkpoint:
            return None
        name = SAM_CHECKPOINTS.get(self.type)
        return "model.sam.checkpoint", (f"the SAM {self.type} checkpoint ({name}, linked from segment-anything's README: "
                f"https://dl.fbaipublicfiles.com/segment_anything/{name})" if name else
                "a checkpoint of this tiny SAM (e.g. one written by msmedcap demo encoders sam)")
