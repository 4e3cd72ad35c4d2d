"""The MSMedCap model: frozen CLIP + SAM encoders, Q-Formers with stage-1 heads, frozen OPT captioner.

The names below load on first use, so importing a light submodule (the settings the config composes)
does not build the model code."""
from __future__ import annotations

import importlib

_WHERE = {"MSMedCap": "msmedcap.models.msmedcap_model", "build_model": "msmedcap.models.loading",
          "load_from_export": "msmedcap.models.loading", "load_trainable": "msmedcap.models.loading",
          "save_trainable": "msmedcap.models.loading"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
