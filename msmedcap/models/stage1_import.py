"""Stage-1 warm start of one branch's Q-Former from the checkpoints BLIP-2 users have.

Two layouts, told apart by their tensor names:

- ``lavis``: LAVIS's ``Blip2Qformer`` state dict (``blip2_pretrained.pth``, ``{"model": state_dict, ...}``):
  ``Qformer.bert.*`` / ``Qformer.cls.predictions.*`` (a BertLMHeadModel, lavis/models/blip2_models/Qformer.py),
  ``query_tokens``, ``ln_vision``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``
  (lavis/models/blip2_models/blip2_qformer.py, blip2.py). Read with ``torch.load(weights_only=True)``.
- ``hf``: transformers' ``Blip2ForImageTextRetrieval`` directory (``Salesforce/blip2-itm-vit-g``):
  ``qformer.*``, ``embeddings.*``, ``query_tokens``, ``vision_model.post_layernorm`` (= ln_vision),
  ``vision_projection``, ``text_projection``, ``itm_head``; it has no temperature and no ITG head.

Every tensor of the branch's Q-Former must come from the checkpoint, except those the layout lacks by
design (HF: ``temp`` and the ITG head) and those ``stage1_skip`` names; every checkpoint tensor that maps
into the Q-Former must fit its shape. Otherwise a :class:`ConfigError` names them. Tensors of other parts
(the frozen image tower, buffers, the tied LM decoder) are ignored and listed in the report.
"""
from __future__ import annotations

import fnmatch
import logging
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from msmedcap.config import ConfigError, resolve_asset

log = logging.getLogger(__name__)

# The Q-Former tensors whose shape follows the encoder width: `stage1_skip: [encoder_side]` leaves them
# at their initialisation (e.g. a ViT-g checkpoint, 1408-wide, into the SAM branch).
ENCODER_SIDE = ("ln_vision.*", "bert.encoder.layer.*.crossattention.attention.key.*",
                "bert.encoder.layer.*.crossattention.attention.value.*")
LAVIS_LN_EPS = 1e-5  # LAVIS's ln_vision: blip2.LayerNorm(nn.LayerNorm) with torch's default eps
HF_ABSENT = {"temp": "Blip2ForImageTextRetrieval has no ITC temperature",
             "itg_transform.*": "Blip2ForImageTextRetrieval has no ITG head",
             "itg_bias": "Blip2ForImageTextRetrieval has no ITG head"}


@dataclass
class Stage1Import:
    """What one import did. Names are the Q-Former's own (``qformers.<branch>.`` left off)."""
    branch: str
    path: str
    layout: str  # lavis | hf
    loaded: list = field(default_factory=list)
    kept: dict = field(default_factory=dict)  # Q-Former tensor -> why it was left at its initialisation
    ignored: dict = field(default_factory=dict)  # checkpoint tensor -> why it was not imported

    def summary(self) -> str:
        groups = Counter(_group(n) for n in self.loaded)
        lines = [f"stage-1 {self.layout} checkpoint {self.path} -> {self.branch} Q-Former: {len(self.loaded)} "
                 f"tensors loaded ({', '.join(f'{g} {n}' for g, n in groups.items())})"]
        if self.kept:
            lines.append(f"  left at their initialisation: {_compact(self.kept)}")
        if self.ignored:
            lines.append(f"  ignored from the checkpoint: {_compact(self.ignored)}")
        return "\n".join(lines)


def _group(name: str) -> str:
    if name.startswith("bert.encoder.layer."):
        return "layers"
    return {"bert": "embedding LayerNorm", "embeddings": "text embeddings", "itg_transform": "ITG head",
            "itg_bias": "ITG head", "vision_proj": "ITC heads", "text_proj": "ITC heads", "temp": "ITC heads",
            "itm_head": "ITM head"}.get(name.split(".")[0], name.split(".")[0])


def _compact(reasons: dict) -> str:
    """``{name: reason}`` -> "reason: a, b (+3 more); ..." grouped by reason."""
    by_reason: dict = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        parts.append(f"{shown}: {reason}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- reading
def read_stage1_checkpoint(path, key: str) -> tuple:
    """``(state_dict, layout, ln_vision eps or None)`` of a LAVIS ``.pth`` or an HF directory/file."""
    from msmedcap.models.weights_io import read_state_dict

    p = Path(resolve_asset(str(path)))
    if not p.exists():
        raise ConfigError(f"{key}: file not found: {p}")
    if p.is_dir():
        state = read_state_dict(p, key)
    elif p.suffix == ".safetensors":
        state = load_file(str(p))
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
            raise ConfigError(f"{key}: {p} does not load with torch.load(weights_only=True): it holds more than "
                              f"tensors and plain containers ({why[:200]}); save its state dict alone") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # LAVIS: {"model": ..., "config": ...}
            state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {p} is not a state dict (or LAVIS's {{'model': state_dict}})")
    if any(k.startswith("Qformer.") for k in state):
        return state, "lavis", LAVIS_LN_EPS
    if any(k.startswith("language_model.") for k in state):
        raise ConfigError(f"{key}: {p} is a Blip2ForConditionalGeneration checkpoint (no Q-Former text side, no "
                          "ITC/ITM heads): import it with model.blip2_checkpoint")
    if any(k.startswith("qformer.") for k in state) and "embeddings.word_embeddings.weight" in state:
        eps = None
        if p.is_dir() and (p / "config.json").is_file():
            from transformers import Blip2Config

            eps = Blip2Config.from_pretrained(p).vision_config.layer_norm_eps  # its post_layernorm's
        return state, "hf", eps
    raise ConfigError(f"{key}: {p} has neither LAVIS's (Qformer.bert.*) nor Blip2ForImageTextRetrieval's "
                      f"(qformer.*, embeddings.*) tensor names; first names: {sorted(state)[:5]}")


# --------------------------------------------------------------------------- name maps
_SELF = re.compile(r"\.(attention|crossattention)\.self\.")


def lavis_key_map(state: dict) -> tuple:
    """LAVIS Blip2Qformer names -> ``({ours: (theirs, tensor)}, {theirs: why ignored})``."""
    out, ignored = {}, {}
    for k, v in state.items():
        if k == "query_tokens" or k.startswith(("ln_vision.", "vision_proj.", "text_proj.", "itm_head.")):
            out[k] = (k, v)
        elif k == "temp":
            out["temp"] = (k, v.reshape(1))  # LAVIS: shape []; ours [1] (DeepSpeed's broadcast)
        elif k.startswith("Qformer."):
            rest = k[len("Qformer."):]
            if rest == "bert.embeddings.position_ids":
                ignored[k] = "a buffer (positions 0..N-1)"
            elif rest == "cls.predictions.decoder.weight":
                ignored[k] = "tied to the word embeddings (checked equal)"
            elif rest == "cls.predictions.decoder.bias":
                ignored[k] = "the same tensor as Qformer.cls.predictions.bias"
            elif rest.startswith(("bert.embeddings.word_embeddings.", "bert.embeddings.position_embeddings.")):
                out[rest[len("bert."):]] = (k, v)
            elif rest.startswith("bert.embeddings.LayerNorm."):
                out["bert.layernorm." + rest.rsplit(".", 1)[1]] = (k, v)
            elif rest.startswith("bert.encoder.layer."):
                out[_SELF.sub(r".\1.attention.", rest)] = (k, v)
            elif rest.startswith("cls.predictions.transform.dense."):
                out["itg_transform.0." + rest.rsplit(".", 1)[1]] = (k, v)
            elif rest.startswith("cls.predictions.transform.LayerNorm."):
                out["itg_transform.2." + rest.rsplit(".", 1)[1]] = (k, v)
            elif rest == "cls.predictions.bias":
                out["itg_bias"] = (k, v)
            else:
                ignored[k] = "no counterpart in the Q-Former"
        elif k.startswith("visual_encoder."):
            ignored[k] = "the frozen image tower (loads from the branch's encoder weights)"
        else:
            ignored[k] = "not part of the stage-1 Q-Former"
    decoder, words = state.get("Qformer.cls.predictions.decoder.weight"), state.get(
        "Qformer.bert.embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise ConfigError("Qformer.cls.predictions.decoder.weight differs from the word embeddings: this Q-Former "
                          "ties its ITG decoder to them and cannot hold an untied one")
    return out, ignored


def hf_itm_key_map(state: dict) -> tuple:
    """transformers Blip2ForImageTextRetrieval names -> ``({ours: (theirs, tensor)}, {theirs: why ignored})``."""
    out, ignored = {}, {}
    for k, v in state.items():
        if k == "query_tokens" or k.startswith("itm_head."):
            out[k] = (k, v)
        elif k.startswith("embeddings.") and not k.endswith("position_ids"):
            out[k] = (k, v)
        elif k.startswith("qformer."):
            out["bert." + k[len("qformer."):]] = (k, v)
        elif k.startswith("vision_model.post_layernorm."):
            out["ln_vision." + k.rsplit(".", 1)[1]] = (k, v)
        elif k.startswith("vision_projection."):
            out["vision_proj." + k.rsplit(".", 1)[1]] = (k, v)
        elif k.startswith("text_projection."):
            out["text_proj." + k.rsplit(".", 1)[1]] = (k, v)
        elif k.startswith("vision_model."):
            ignored[k] = "the frozen image tower (loads from the branch's encoder weights)"
        else:
            ignored[k] = "not part of the stage-1 Q-Former"
    return out, ignored


# --------------------------------------------------------------------------- import
def skip_patterns(skip: list, key: str) -> list:
    if not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip):
        raise ConfigError(f"{key}: expected a list of name patterns (or 'encoder_side'), got {skip!r}")
    return [p for s in skip for p in (ENCODER_SIDE if s == "encoder_side" else (s,))]


def import_stage1(model, branch: str, path, skip: list = ()) -> Stage1Import:
    """Load a stage-1 checkpoint (LAVIS or HF layout) into ``model.qformers[branch]``; returns the report
    (also logged). Raises :class:`ConfigError` naming the tensors that do not fit, before loading any."""
    key = f"model.{branch}.stage1_checkpoint"
    patterns = skip_patterns(list(skip), f"model.{branch}.stage1_skip")
    qformer = model.qformers[branch]
    state, layout, eps = read_stage1_checkpoint(path, key)
    mapped, ignored = (lavis_key_map if layout == "lavis" else hf_itm_key_map)(state)
    report = Stage1Import(branch, str(path), layout, ignored=ignored)
    absent = HF_ABSENT if layout == "hf" else {}

    def reason_absent(name: str):
        return next((why for pat, why in absent.items() if fnmatch.fnmatchcase(name, pat)), None)

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    if qformer.ln_vision is None:
        for name in [n for n in mapped if n.startswith("ln_vision.")]:
            report.ignored[mapped.pop(name)[0]] = f"model.{branch}.ln_vision is false (no LayerNorm on its tokens)"
    mine = qformer.state_dict()
    bad, load = [], {}
    for name, (theirs, value) in mapped.items():
        if skipped(name):
            report.ignored[theirs] = f"model.{branch}.stage1_skip"
        elif name not in mine:
            bad.append(f"{theirs} {tuple(value.shape)}: no {name} in the {branch} Q-Former")
        elif mine[name].shape != value.shape:
            bad.append(f"{theirs} {tuple(value.shape)} -> {name} {tuple(mine[name].shape)}")
        else:
            load[name] = value
    missing = []
    for name in mine:
        if name in load:
            continue
        if skipped(name):
            report.kept[name] = f"model.{branch}.stage1_skip"
        elif reason_absent(name):
            report.kept[name] = reason_absent(name)
        elif name.startswith("adapter."):
            report.kept[name] = f"model.{branch}.token_mlp: not in BLIP-2, starts as the identity"
        elif name not in mapped:
            missing.append(name)
    if bad or missing:
        msg = [f"{key} {path} ({layout} layout) does not fit the {branch} Q-Former:"]
        if bad:
            msg.append(f"{len(bad)} checkpoint tensors do not fit: " + "; ".join(bad[:20])
                       + (f"; ... {len(bad) - 20} more" if len(bad) > 20 else ""))
        if missing:
            msg.append(f"{len(missing)} Q-Former tensors are not in the checkpoint: " + ", ".join(missing[:20])
                       + (f", ... {len(missing) - 20} more" if len(missing) > 20 else ""))
        wide = [b for b in bad if any(fnmatch.fnmatchcase(b.split(" -> ")[-1].split(" ")[0], p) for p in ENCODER_SIDE)]
        if wide:
            msg.append(f"(the encoder widths differ: model.{branch}.stage1_skip=[encoder_side] leaves ln_vision and "
                       "the cross-attention keys/values at their initialisation)")
        if any("word_embeddings" in b or "itg_bias" in b for b in bad):
            msg.append("(the vocabulary differs: LAVIS and HF BLIP-2 use bert-base-uncased + [DEC], 30523 tokens)")
        raise ConfigError(" ".join(msg))
    qformer.load_state_dict(load, strict=False)
    if eps is not None and qformer.ln_vision is not None and "ln_vision.weight" in load:
        qformer.ln_vision.eps = eps
    report.loaded = sorted(load)
    log.info("%s", report.summary())
    return report
