"""The CLIP branch's preprocessing as open_clip itself would pick it for ``model.clip``: mean/std,
interpolation, resize mode, fill colour and size, without building the model.

open_clip's ``create_model`` starts from ``PreprocessCfg()`` (OpenAI mean/std, bicubic, shortest-side
resize + center crop) and merges, in order: the ``preprocess_cfg`` of a ``local-dir:`` folder's or an
``hf-hub:`` repository's ``open_clip_config.json``, or the pretrained tag's entry (``get_pretrained_cfg``)
for a built-in name; the final size is the built tower's image size (``model.clip.image_size``, passed
as ``force_image_size``). :func:`clip_preprocess` follows the same steps with open_clip's own functions
(``parse_model_name``, ``_get_hf_config``, ``get_pretrained_cfg``, ``merge_preprocess_dict``), so the
loader's workers get the geometry before any model exists; ``ClipEncoder`` checks it against the
built model's ``get_model_preprocess_cfg``. ``hf-hub:`` names read the repository's config through
huggingface_hub, so they resolve offline from a local cache (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from msmedcap.errors import ConfigError
from msmedcap.paths import resolve_asset

SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip names whose config, preprocessing and weights come with them
RESIZE_MODES = ("shortest", "longest", "squash")  # open_clip.transform.image_transform's eval modes
INTERPOLATIONS = ("bicubic", "bilinear", "random")  # "random" is bicubic at eval (image_transform)


def has_schema(name: str) -> bool:
    """An ``hf-hub:``/``local-dir:`` name: config and weights come with the name (open_clip ignores ``pretrained``)."""
    return name.startswith(SCHEMAS)


def open_clip_name(name: str, key: str = "model.clip.name") -> str:
    """A built-in open_clip model name or a schema name as it is, or a model-config JSON registered with
    open_clip first (its stem is then the name); ``key`` is the setting a missing JSON is named by."""
    import open_clip

    if name.endswith(".json") and not has_schema(name):
        path = Path(resolve_asset(name))
        if not path.is_file():
            raise ConfigError(f"{key}: open_clip model config not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    return name


def schema_config(name: str) -> dict:
    """The ``open_clip_config.json`` of an ``hf-hub:``/``local-dir:`` name (``model_cfg``, ``preprocess_cfg``)."""
    from open_clip.factory import _get_hf_config, parse_model_name

    schema, ident = parse_model_name(name)
    try:
        if schema == "local-dir":
            with open(Path(ident) / "open_clip_config.json", encoding="utf-8") as f:
                config = json.load(f)
        else:
            config = _get_hf_config(ident)
    except Exception as e:  # noqa: BLE001 - missing file, no network and no cached copy, bad JSON
        raise ConfigError(f"model.clip.name: cannot read the open_clip_config.json of {name}: "
                          f"{type(e).__name__}: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ConfigError(f"model.clip.name: the open_clip_config.json of {name} has no 'model_cfg'")
    return config


def model_image_size(name: str) -> int:
    """The square input side open_clip builds ``name``'s tower at when no size is forced (its model config's
    ``vision_cfg.image_size``, which open_clip's final preprocess config then takes)."""
    from open_clip.factory import get_model_config

    config = schema_config(name)["model_cfg"] if has_schema(name) else get_model_config(open_clip_name(name))
    size = ((config or {}).get("vision_cfg") or {}).get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"model.clip.image_size: null takes the model's own size, but {name}'s open_clip config has "
                          f"no square vision_cfg.image_size ({size!r}); set model.clip.image_size")
    return size


@lru_cache(maxsize=16)
def _resolve(name: str, pretrained: str | None, image_size: int) -> tuple:
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = asdict(PreprocessCfg())
    if has_schema(name):
        cfg = merge_preprocess_dict(cfg, schema_config(name).get("preprocess_cfg") or {})
    elif pretrained:
        tag = get_pretrained_cfg(open_clip_name(name).replace("/", "-"), pretrained)  # {} for a weights file
        cfg = merge_preprocess_dict(cfg, tag or {})
    cfg["size"] = image_size  # create_model: the built tower's size (force_image_size)
    return tuple(sorted(cfg.items()))


def clip_preprocess(section) -> dict:
    """open_clip's final preprocess config for ``model.clip`` (``size`` = ``section.image_size``), with
    mean/std as 3-tuples of floats; a ConfigError naming ``model.clip.name`` for values open_clip's eval
    transform does not take."""
    cfg = dict(_resolve(section.name, section.pretrained, section.image_size))
    where = f"model.clip.name: {section.name}'s preprocess_cfg"
    if cfg["resize_mode"] not in RESIZE_MODES:
        raise ConfigError(f"{where}: resize_mode {cfg['resize_mode']!r} is not one of {', '.join(RESIZE_MODES)}")
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(f"{where}: interpolation {cfg['interpolation']!r} is not one of {', '.join(INTERPOLATIONS)}")
    for key in ("mean", "std"):
        v = cfg[key]
        v = (v,) * 3 if isinstance(v, (int, float)) else tuple(v)
        if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v) or (key == "std" and min(v) <= 0):
            raise ConfigError(f"{where}: {key} must be 3 numbers{' > 0' if key == 'std' else ''}, got {cfg[key]!r}")
        cfg[key] = tuple(float(x) for x in v)
    if not isinstance(cfg["fill_color"], int) or not 0 <= cfg["fill_color"] <= 255:
        raise ConfigError(f"{where}: fill_color must be an integer in 0..255, got {cfg['fill_color']!r}")
    return cfg
