"""The encoder registry: one :class:`EncoderSpec` per frozen image encoder (a *branch*).

Everything outside an encoder's own module learns about it here: the model builds it
(``MSMedCap``), the loader and ``msmedcap caption`` resize images for it (``encoder_transforms``),
the batch carries them under its keys, the feature cache names its store, the gallery picks a
thumbnail source. The built-in branches, ``clip`` and ``sam``, are registered at the bottom.

A branch's names follow from the spec:

    config section   ``model.<branch>``          (``spec.config``; ``ModelConfig`` has the field)
    batch keys       ``<branch>_image``, ``<branch>_image_size``   (msmedcap.batch)
    cache store      ``<feature_cache>/<branch>-<digest of spec.identity(section), dtype, shape, weights>``

Light on purpose (config only): DataLoader workers import it. The encoder and the transform may be
named as ``"module:Class"``, imported the first time they are used, so the data side never imports
model code and the registry no module that imports it (the built-in ones are named so).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Union

from msmedcap.config import ClipConfig, SamConfig


@dataclass(frozen=True)
class EncoderSpec:
    """One frozen image encoder as the rest of msmedcap sees it."""

    branch: str  # the branch name: model.<branch>, <branch>_image, the cache store's prefix
    config: type  # the dataclass of model.<branch>; has image_size
    # A msmedcap.models.encoders.FrozenEncoder subclass called with the config section (or "module:Class").
    encoder: Union[str, Callable[[Any], Any]]
    # The image geometry (or "module:Class"), built by make_transform: transform.from_config(section) where the
    # class has it, else transform(section.image_size); mean, std, target, pixels, out_shape, tensor_pixels,
    # __call__, as msmedcap.data.transforms.ClipTransform.
    transform: Union[str, type]
    # The transform fits the whole image in the input (longest-side resize) and the encoder zero-pads it
    # to a square (SAM). Thumbnails prefer such an image (uncropped) at equal size and crop the padding.
    padded: bool = False
    # The section's part of the feature cache's identity: another value, another store. The default
    # (the whole section) is what the cache has always used, so existing caches keep hitting.
    identity: Callable[[Any], dict] = dataclasses.asdict

    @property
    def image_key(self) -> str:
        return f"{self.branch}_image"

    @property
    def size_key(self) -> str:
        return f"{self.branch}_image_size"

    def section(self, model_cfg) -> Any:
        """This branch's config section of a ModelConfig (``model.<branch>``)."""
        return getattr(model_cfg, self.branch)

    @property
    def transform_class(self) -> type:
        return _load(self.transform)

    def make_transform(self, section) -> Any:
        """The transform for config ``section``: ``transform.from_config(section)`` where the class has it
        (preprocessing beyond the size: the CLIP and SAM transforms), else ``transform(section.image_size)``."""
        cls = self.transform_class
        return cls.from_config(section) if hasattr(cls, "from_config") else cls(section.image_size)

    def build(self, section) -> Any:
        """The (not yet frozen) encoder for config ``section``."""
        return _load(self.encoder)(section)


def _load(ref):
    if isinstance(ref, str):
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)
    return ref


ENCODERS: dict = {}  # branch -> EncoderSpec, in registration order


def register_encoder(spec: EncoderSpec, replace: bool = False) -> EncoderSpec:
    """Add ``spec`` under ``spec.branch``; registering a taken branch again needs ``replace=True``."""
    if spec.branch in ENCODERS and not replace and ENCODERS[spec.branch] != spec:
        raise ValueError(f"encoder branch {spec.branch!r} is already registered")
    ENCODERS[spec.branch] = spec
    return spec


def encoder_spec(branch: str) -> EncoderSpec:
    try:
        return ENCODERS[branch]
    except KeyError:
        raise KeyError(f"no encoder registered for branch {branch!r} (registered: {', '.join(ENCODERS)})") from None


def encoder_specs(branches) -> list:
    """The specs of ``branches`` (e.g. ``cfg.model.branches``), in that order."""
    return [encoder_spec(b) for b in branches]


def clip_identity(section) -> dict:
    """The whole section, and the resolved preprocess config where it is not the one every store before issue
    23 was computed with (open_clip's default: OpenAI mean/std, bicubic, shortest side), so those stores keep
    hitting and another preprocessing gets another store."""
    from open_clip.transform import PreprocessCfg

    from msmedcap.data.clip_preprocess import clip_preprocess

    out = dataclasses.asdict(section)
    pre = json.loads(json.dumps(clip_preprocess(section), sort_keys=True))
    if pre != json.loads(json.dumps({**dataclasses.asdict(PreprocessCfg()), "size": section.image_size})):
        out["preprocess"] = pre
    return out


def sam_identity(section) -> dict:
    """The whole section; ``preprocess`` only when not ``sam`` (stores before issue 23 were ``sam``)."""
    out = dataclasses.asdict(section)
    if out.get("preprocess") == "sam":
        del out["preprocess"]
    return out


register_encoder(EncoderSpec("clip", ClipConfig, "msmedcap.models.encoders:ClipEncoder",
                                  "msmedcap.data.transforms:ClipTransform", identity=clip_identity))
register_encoder(EncoderSpec("sam", SamConfig, "msmedcap.models.encoders:SamEncoder",
                                  "msmedcap.data.transforms:SamTransform", padded=True, identity=sam_identity))
