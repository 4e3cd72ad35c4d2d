"""Finding and loading the weights export to evaluate: an export directory (trainable.safetensors
+ config.yaml, written by the trainer), a self-contained model directory (msmedcap.export.bundle) or a
run directory, whose newest complete export is used."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from msmedcap.models.weights_io import CONFIG_FILE as EXPORT_CONFIG  # the names save_trainable writes
from msmedcap.models.weights_io import TRAINABLE_FILE as EXPORT_WEIGHTS


class CheckpointError(ValueError):
    """No usable export where the user pointed: says where it looked."""


def is_export(path: Path) -> bool:
    from msmedcap.export.bundle import is_bundle

    return ((path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file()) or is_bundle(path)


def read_config(export: Path):
    """The Config of an export or model directory, without building the model."""
    import yaml

    from msmedcap.config import config_from_dict
    from msmedcap.export.bundle import is_bundle, stored_config

    if is_bundle(export):
        return stored_config(export)
    return config_from_dict(yaml.safe_load((Path(export) / EXPORT_CONFIG).read_text()))


def load_model_dir(export: Path) -> tuple:
    """(model, Config) of an export (frozen parts from their original weights) or a model directory."""
    from msmedcap.export.bundle import is_bundle, load_bundle
    from msmedcap.models import load_from_export

    return load_bundle(export) if is_bundle(export) else load_from_export(str(export))


def find_export(path) -> Path:
    """``path`` itself if it is an export, else the newest export under it. Directories whose name
    starts with a dot (checkpoints being written or deleted) are never used."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: no such checkpoint, export or run directory")
    if p.is_file():
        p = p.parent  # e.g. .../export/trainable.safetensors
    if is_export(p):
        return p
    found = [w.parent for w in p.rglob(EXPORT_WEIGHTS)
             if is_export(w.parent) and not any(part.startswith(".") for part in w.parent.relative_to(p).parts)]
    if not found:
        raise CheckpointError(f"{path}: no export ({EXPORT_WEIGHTS} + {EXPORT_CONFIG}) in it or below it; "
                              "is training finished, or is this the right run directory?")
    return max(found, key=lambda d: (d / EXPORT_WEIGHTS).stat().st_mtime)


def default_out_dir(checkpoint_arg, export: Path) -> Path:
    """<run dir>/eval when a run directory was given, else <export>/eval."""
    given = Path(checkpoint_arg)
    return (export if is_export(given) or given.is_file() else given) / "eval"


def parse_eval_overrides(overrides: Sequence[str]) -> list:
    """Parsed overrides; only eval.* and data.* (the model is built from the export's own config).
    Cheap: call it before loading a model, so a typo fails at once."""
    from msmedcap.config import Config, ConfigError, _merge, config_from_dict, parse_override

    parsed = [parse_override(ov) for ov in overrides]
    for ov, p in zip(overrides, parsed):
        if set(p) - {"eval", "data"}:
            raise ConfigError(f"override {ov!r}: only eval.* and data.* can change at evaluation "
                              "(the model is built from the export's own config)")
    data = Config().to_dict()  # unknown keys and wrong types fail here, on a default config
    data["model"]["allow_random_weights"] = True  # whose model (no weights given) is never built
    for p in parsed:
        data = _merge(data, p)
    config_from_dict(data, check_files=False)
    return parsed


def apply_overrides(cfg, overrides: Sequence[str]):
    """eval.* and data.* overrides on a loaded config -> a new, validated config."""
    from msmedcap.config import _merge, config_from_dict

    data = cfg.to_dict()
    for parsed in parse_eval_overrides(overrides):
        data = _merge(data, parsed)
    return config_from_dict(data, check_files=False)


def check_eval_shards(specs: Sequence[str]) -> None:
    """Local eval shards must exist (train shards need not be on an evaluation machine)."""
    from msmedcap.data.shard_spec import check_local_shards

    check_local_shards("data.eval", list(specs))


def load_for_eval(export: Path, overrides: Sequence[str] = (), device: Optional[object] = None,
                  data: Optional[Sequence[str]] = None, check_shards: bool = True):
    """-> (model in eval mode on ``device``, its config with overrides and ``data`` eval specs).
    Overrides and eval shards are checked before the model is built."""
    parse_eval_overrides(overrides)
    if data and check_shards:
        check_eval_shards(data)
    model, cfg = load_model_dir(export)
    cfg = apply_overrides(cfg, overrides)
    if data:
        cfg.data.eval = list(data)
    if check_shards:
        check_eval_shards(cfg.data.eval)
    if device is not None:
        model.to(device)
    model.eval()
    return model, cfg
