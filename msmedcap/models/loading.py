"""Building the model with its weights; loading an export; HF BLIP-2 import; stage-1 Q-Former warm
starts from LAVIS ``blip2_pretrained.pth`` and HF ``Blip2ForImageTextRetrieval``. The weight files
themselves (export, HF state dicts) are read and written by msmedcap.models.weights_io.

Everything is read with safetensors or ``torch.load(weights_only=True)``: nothing is unpickled.
"""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import torch
import yaml
from torch import nn

from msmedcap.config import ConfigError, ModelConfig, config_from_dict, resolve_asset
from msmedcap.models.encoders import weights_mismatch
from msmedcap.models.lora import add_lora, check_lora, merge_lora
from msmedcap.models.msmedcap_model import MSMedCap
from msmedcap.models.stage1_import import import_stage1
from msmedcap.models.weights_io import (CONFIG_FILE, TRAINABLE_FILE, load_trainable, read_state_dict,  # noqa: F401
                                        save_trainable)

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, init_trainables: bool = True, with_lm: bool = True) -> MSMedCap:
    """The model of ``cfg``: frozen parts from their weights (open_clip tag/file, SAM checkpoint, OPT
    directory, a BLIP-2 checkpoint) or random init; Q-Formers from BERT when ``qformer.init_from`` is set,
    then from ``model.<branch>.stage1_checkpoint`` (LAVIS or HF stage-1; reports in ``model.stage1_imports``);
    both skipped with ``init_trainables=False``, when an export overwrites them anyway. ``with_lm=False``
    (stage 1) builds no LM: the trainables are the same, the LM's weights are never read.

    With ``blip2_checkpoint`` and neither ``lm.name_or_path`` nor ``lm.config``, the LM's architecture comes
    from the checkpoint's ``text_config`` (its weights from the checkpoint)."""
    cfg = with_lm_architecture(cfg)
    if with_lm:
        check_lora(cfg)  # a LoRA target the LM lacks fails before any weight is read
    model = MSMedCap(cfg, with_lm=with_lm)
    if cfg.qformer.init_from and init_trainables:
        for qformer in model.qformers.values():
            qformer.init_from_bert(cfg.qformer.init_from)
    model.stage1_imports = {}
    for branch in model.branches:  # after BERT (the checkpoint wins), before blip2_checkpoint (that wins)
        branch_cfg = getattr(cfg, branch)
        if branch_cfg.stage1_checkpoint and init_trainables:
            model.stage1_imports[branch] = import_stage1(model, branch, branch_cfg.stage1_checkpoint,
                                                         branch_cfg.stage1_skip)
    if cfg.blip2_checkpoint:
        import_blip2(model, cfg.blip2_checkpoint)
    add_lora(model)  # after every LM weight is loaded (under the LM's own tensor names)
    if cfg.feature_cache_dir:
        from msmedcap.models.feature_cache import attach_feature_cache

        attach_feature_cache(model, cfg.feature_cache_dir)
    counts = model.parameter_counts()
    log.info("parameters: %s", ", ".join(f"{k} {v['trainable'] / 1e6:.1f}M trainable + {v['frozen'] / 1e6:.1f}M "
                                         "frozen" for k, v in counts.items()))
    return model


def with_lm_architecture(cfg: ModelConfig) -> ModelConfig:
    """``cfg``, or with ``blip2_checkpoint`` and neither ``lm.name_or_path`` nor ``lm.config`` a copy whose
    ``lm.config`` is the checkpoint's ``text_config``: what the LM is built from."""
    if cfg.blip2_checkpoint and not cfg.lm.name_or_path and not cfg.lm.config:
        cfg = copy.deepcopy(cfg)
        cfg.lm.config = blip2_text_config(cfg.blip2_checkpoint)
    return cfg


def load_from_export(path_dir, merge: bool = True) -> tuple:
    """Rebuild the model of an export (frozen parts from their original weights) -> (model, Config), for
    inference: an LM's LoRA is merged into its weights (``merge=False`` keeps the adapters apart)."""
    path_dir = Path(path_dir)
    try:
        cfg = config_from_dict(yaml.safe_load((path_dir / CONFIG_FILE).read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path_dir} is not an export: no {CONFIG_FILE}") from None
    model = build_model(cfg.model, init_trainables=False)
    model.load_trainable(path_dir, strict=True)
    if merge:
        merge_lora(model)
    return model, cfg


# --------------------------------------------------------------------------- HF BLIP-2 import
def blip2_text_config(directory) -> dict:
    """``model.lm.config`` of a BLIP-2 checkpoint's language model: its ``text_config`` (OPT, T5 or any
    causal LM transformers builds), ``model_type`` included."""
    from transformers import Blip2Config

    from msmedcap.models.lm_families import family_of

    text_config = Blip2Config.from_pretrained(resolve_asset(str(directory))).text_config
    family_of(text_config, "model.blip2_checkpoint", f"{directory}'s text_config")
    text = text_config.to_diff_dict()
    text["model_type"] = text_config.model_type
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        text.pop(key, None)
    return text


# HF BLIP-2 name prefix <-> this model's, CLIP branch (the vision tower is mapped separately); export reverses it
BLIP2_PREFIXES = (("query_tokens", "qformers.clip.query_tokens"), ("qformer.", "qformers.clip.bert."),
                  ("vision_model.post_layernorm.", "qformers.clip.ln_vision."),
                  ("language_projection.", "captioner.projections.clip."), ("language_model.", "captioner.lm."))


def blip2_key_map(state: dict) -> dict:
    """HF BLIP-2 names -> this model's names, CLIP branch (the vision tower is mapped separately)."""
    out = {}
    for key, value in state.items():
        for theirs, ours in BLIP2_PREFIXES:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
    return out


def eva_vision_key_map(state: dict, prefix: str = "encoders.clip.visual.trunk.") -> dict:
    """HF ``Blip2VisionModel`` (EVA ViT-g) names -> timm ``Eva`` names inside open_clip's tower."""
    out = {}
    emb = "vision_model.embeddings."
    names = {emb + "class_embedding": "cls_token", emb + "position_embedding": "pos_embed",
             emb + "patch_embedding.weight": "patch_embed.proj.weight",
             emb + "patch_embedding.bias": "patch_embed.proj.bias"}
    for key, value in state.items():
        if key in names:
            out[prefix + names[key]] = value
            continue
        if not key.startswith("vision_model.encoder.layers."):
            continue
        i, rest = key[len("vision_model.encoder.layers."):].split(".", 1)
        block = f"{prefix}blocks.{i}."
        if rest == "self_attn.qkv.bias":  # q | k (zero in EVA) | v
            q, _, v = value.chunk(3)
            out[block + "attn.q_bias"], out[block + "attn.v_bias"] = q, v
            continue
        rest = (rest.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
                .replace("self_attn.projection", "attn.proj").replace("self_attn.", "attn."))
        out[block + rest] = value
    return out


BLIP2_PARTS = ("query_tokens", "qformer.", "vision_model.", "language_projection.", "language_model.")
_TEXT_FFN = re.compile(r"qformers\.clip\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.")


def blip2_expected(model: MSMedCap) -> list:
    """The model's tensors a ``Blip2ForConditionalGeneration`` checkpoint provides: the CLIP branch's
    Q-Former (queries, ``ln_vision`` if any, its layers but the text FFN: BLIP-2's captioner has no text
    input), the CLIP projection and the whole LM when it is built (but a head tied to the input embeddings)."""
    tied = tied_aliases(model)
    return [k for k in model.state_dict() if k not in tied and not _TEXT_FFN.match(k) and k.startswith((
        "qformers.clip.query_tokens", "qformers.clip.ln_vision.", "qformers.clip.bert.",
        "captioner.projections.clip.", "captioner.lm."))]


def tied_aliases(model: MSMedCap) -> set:
    """The LM's parameter names that are another name of an earlier parameter (OPT's tied ``lm_head``, T5's
    ``encoder/decoder.embed_tokens`` = ``shared``): a checkpoint holds each tensor once."""
    lm = model.captioner.lm
    if lm is None:
        return set()
    seen, aliases = set(), set()
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add("captioner.lm." + name)
        seen.add(id(p))
    return aliases


def untie_where_they_differ(model: MSMedCap, tensors: dict) -> None:
    """A checkpoint holding two names of one tied LM tensor with different values (Flan-T5's own ``lm_head``
    beside ``shared``: transformers' T5 config ties them, its loader unties them then) gets them untied here
    too, each loading its own values."""
    lm = model.captioner.lm
    if lm is None:
        return
    groups: dict = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        given = [n for n in names if "captioner.lm." + n in tensors]
        for name in given[1:]:
            value = tensors["captioner.lm." + name]
            if not torch.equal(value, tensors["captioner.lm." + given[0]]):
                owner, attr = name.rsplit(".", 1)
                shared = getattr(lm.get_submodule(owner), attr)
                setattr(lm.get_submodule(owner), attr, nn.Parameter(torch.empty_like(shared), requires_grad=False))
                lm.config.tie_word_embeddings = False


def import_blip2(model: MSMedCap, directory) -> None:
    """An HF-format BLIP-2 checkpoint (``Blip2ForConditionalGeneration.save_pretrained``, e.g.
    Salesforce/blip2-opt-2.7b) into the CLIP branch: Q-Former, query tokens, ``ln_vision``, language
    projection and LM (OPT, T5, any causal LM) must match the config's shapes and be there, every one (:func:`blip2_expected`); the
    vision tower loads into open_clip's EVA where names and shapes match, and must provide all of it when
    ``model.clip.pretrained`` is not set. Tensors of none of these parts are refused."""
    from transformers import Blip2Config

    directory = Path(resolve_asset(str(directory)))
    if "clip" not in model.branches:
        raise ConfigError(f"model.blip2_checkpoint imports into the CLIP branch; variant {model.cfg.variant} has none")
    hf = Blip2Config.from_pretrained(directory)
    q = model.cfg.qformer
    expected = {"num_query_tokens": (hf.num_query_tokens, q.num_query_tokens),
                "qformer.hidden_size": (hf.qformer_config.hidden_size, q.hidden_size),
                "qformer.num_layers": (hf.qformer_config.num_hidden_layers, q.num_layers),
                "qformer.cross_attention_freq": (hf.qformer_config.cross_attention_frequency, q.cross_attention_freq),
                "clip encoder width": (hf.qformer_config.encoder_hidden_size, model.encoders["clip"].width)}
    for key, (theirs, ours) in expected.items():
        if theirs != ours:
            raise ConfigError(f"model.blip2_checkpoint {directory}: {key} is {theirs}, the config gives {ours}")
    state = read_state_dict(directory)
    mine = model.state_dict()
    main = blip2_key_map(state)
    if model.captioner.lm is None:  # built without its LM (stage 1): the LM's tensors load when it is built
        main = {k: v for k, v in main.items() if not k.startswith("captioner.lm.")}
    if model.qformers["clip"].ln_vision is None:  # model.clip.ln_vision=false: post_layernorm has no place
        main = {k: v for k, v in main.items() if not k.startswith("qformers.clip.ln_vision.")}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(mine[k].shape) if k in mine else 'absent'}"
           for k, v in main.items() if k not in mine or mine[k].shape != v.shape]
    if bad:
        raise ConfigError(f"model.blip2_checkpoint {directory}: {len(bad)} tensors do not fit: {bad[:5]}")
    vision = {k: v for k, v in eva_vision_key_map(state).items() if k in mine and mine[k].shape == v.shape}
    untie_where_they_differ(model, main)
    missing = [k for k in blip2_expected(model) if k not in main]
    if not model.cfg.clip.pretrained:  # the tower's weights come from here alone: every tensor of it
        missing += [k for k in mine if k.startswith("encoders.clip.") and k not in vision]
    unexpected = [k for k in state if not k.startswith(BLIP2_PARTS)]
    if missing or unexpected:
        raise weights_mismatch("model.blip2_checkpoint", directory, f"the {model.cfg.variant} model's CLIP branch, "
                               f"LM{'' if model.cfg.clip.pretrained else ' and CLIP tower (model.clip.pretrained is null)'}",
                               missing, unexpected)
    model.load_state_dict({**main, **vision}, strict=False)
    if model.qformers["clip"].ln_vision is not None:
        model.qformers["clip"].ln_vision.eps = hf.vision_config.layer_norm_eps  # BLIP-2's post_layernorm
    skipped = sum(1 for k in state if k.startswith("vision_model.")) - len(vision) - 2  # -2: post_layernorm
    log.info("BLIP-2 %s imported: %d Q-Former/projection/LM tensors, %d vision tensors (%d skipped: no "
             "matching name or shape in %s)", directory, len(main), len(vision), max(skipped, 0), model.cfg.clip.name)
