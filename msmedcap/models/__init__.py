"""The MSMedCap model: frozen CLIP + SAM encoders, Q-Formers with stage-1 heads, frozen OPT captioner."""
from msmedcap.models.loading import build_model, load_from_export, load_trainable, save_trainable
from msmedcap.models.msmedcap_model import MSMedCap

__all__ = ["MSMedCap", "build_model", "load_from_export", "load_trainable", "save_trainable"]
