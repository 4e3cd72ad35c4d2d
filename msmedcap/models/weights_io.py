"""Weight files in and out, with no model import (so the model and its builders can both use them):
the trainable-weights export (``trainable.safetensors`` + ``config.yaml``) and HF model directories'
state dicts. Read with safetensors or ``torch.load(weights_only=True)``: nothing is unpickled."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from msmedcap.atomic_files import atomic_write
from msmedcap.config import Config, ConfigError, ModelConfig

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
CONFIG_FILE = "config.yaml"


# --------------------------------------------------------------------------- trainable export
def save_trainable(model, path_dir, cfg, values: Optional[dict] = None) -> Path:
    """Write ``trainable.safetensors`` (trainable parameters only) and ``config.yaml`` (the full
    :class:`Config`; a bare ModelConfig is wrapped) into ``path_dir``. ``values``: tensors written in place
    of some parameters' own (the optimizer's fp32 masters, msmedcap.train.engine.fp32_masters)."""
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(cfg, ModelConfig):
        cfg = Config(model=cfg)
    values = values or {}
    tensors = {n: values.get(n, p).detach().to("cpu").contiguous() for n, p in model.trainable_named_parameters()}
    meta = {"format": "msmedcap-trainable", "variant": model.cfg.variant}
    atomic_write(path_dir / TRAINABLE_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(path_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
    return path_dir


def load_trainable(model, path, strict: bool = True) -> None:
    """Load an export's trainable weights (a directory or the ``.safetensors`` file). ``strict=False``
    allows missing and extra names (e.g. stage 2 starting from another variant's stage 1)."""
    path = Path(path)
    file = path / TRAINABLE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no trainable weights at {file}")
    state = load_file(str(file))
    params = dict(model.trainable_named_parameters())
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if strict and (missing or unexpected):
        raise ValueError(f"{file}: {len(missing)} trainable tensors missing {missing[:5]}, "
                         f"{len(unexpected)} unexpected {unexpected[:5]}")
    for name in sorted(params.keys() & state.keys()):
        if params[name].shape != state[name].shape:
            raise ValueError(f"{file}: {name} has shape {tuple(state[name].shape)}, "
                             f"the model's is {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(state[name])
    log.info("loaded %d trainable tensors from %s (%d missing, %d ignored)",
             len(params.keys() & state.keys()), file, len(missing), len(unexpected))


# --------------------------------------------------------------------------- HF model directories
def read_state_dict(directory: Path, key: str = "model.blip2_checkpoint") -> dict:
    """All tensors of an HF model directory (safetensors, sharded or not; else ``.bin`` weights_only)."""
    for index_name, reader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", None)):
        index = directory / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if (directory / f).is_file()][:1]
    if not files:
        raise ConfigError(f"{key}: no weights (model.safetensors / pytorch_model.bin) in {directory}")
    state = {}
    for f in files:
        p = str(directory / f)
        state.update(load_file(p) if f.endswith(".safetensors") else torch.load(p, map_location="cpu",
                                                                                 weights_only=True))
    return state
