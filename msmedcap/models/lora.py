"""LoRA on the frozen LM (``model.lm.lora``), through peft's own LoRA tuner.

peft's ``LoraModel`` injects the adapters into the LM in place: the LM keeps its class and its
``generate``, and each adapted ``nn.Linear`` becomes a ``lora.Linear`` holding the frozen layer as
``base_layer`` beside ``lora_A`` / ``lora_B``. The adapters are trainables of the model like the
Q-Formers (stage 2 trains them; the export carries them as ``captioner.lm.<module>.lora_A.default.weight``
...); for inference (:func:`merge_lora`) peft's ``merge_and_unload`` folds them into the LM's weights,
which gives back the LM's own modules with no adapter cost per token.

The adapters go in after the LM's weights are final (its own directory, a BLIP-2 checkpoint), so
weight loading sees the LM's own tensor names; :func:`check_lora` tries the same injection on an
empty (meta-device) copy of the LM first, so a target that matches nothing fails before any weight is read.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from msmedcap.errors import ConfigError
from msmedcap.models.lora_settings import LMLoraConfig

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name: it is part of every LoRA tensor's name


def peft_config(lora: LMLoraConfig):
    """``model.lm.lora`` as peft's ``LoraConfig``; empty ``target_modules``: peft's default for the LM's family."""
    from peft import LoraConfig

    targets = lora.target_modules
    targets = None if not targets else ("all-linear" if targets == ["all-linear"] else list(targets))
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none")


def _inject(lm: nn.Module, lora: LMLoraConfig, low_cpu_mem_usage: bool = False):
    """peft's tuner on ``lm`` (adapters injected in place); its errors as a ConfigError naming the key."""
    from peft.tuners.lora import LoraModel

    try:
        return LoraModel(lm, peft_config(lora), ADAPTER, low_cpu_mem_usage=low_cpu_mem_usage)
    except ValueError as e:  # no target found, an unsupported module type, no default for this family
        text = str(e)
        if " is not supported. " in text:  # peft prints the whole module: its class name says enough
            kind = text.partition("Target module ")[2].partition("(")[0]
            text = f"a {kind} cannot be adapted. {text.partition(' is not supported. ')[2]}"
        raise ConfigError(f"model.lm.lora.target_modules={lora.target_modules or '(peft default)'}: "
                          f"{text[:500]}") from e


def _skeleton(cfg) -> nn.Module:
    """The LM of ``cfg`` (a ModelConfig whose LM architecture is given: loading.with_lm_architecture) on
    the meta device, through its family's Auto class: its module tree, no weights allocated or read."""
    import transformers

    from msmedcap.models.lm_families import family_of, lm_config
    from msmedcap.tokenization import load_lm_tokenizer

    config = lm_config(cfg.lm, load_lm_tokenizer(cfg.lm.tokenizer))
    auto = getattr(transformers, family_of(config, "model.lm", cfg.lm.name_or_path or "model.lm.config").auto_class)
    with torch.device("meta"):
        return auto.from_config(config)


def check_lora(cfg) -> None:
    """``model.lm.lora`` (``cfg``: a ModelConfig through loading.with_lm_architecture) against the LM it
    would adapt, before any weight is read: every entry of ``target_modules`` must name modules of the
    LM (a typo would otherwise leave part of the intended adaptation out silently), and peft must accept
    them (types it can adapt). No-op without LoRA."""
    lora = cfg.lm.lora
    if lora is None:
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    lm = _skeleton(cfg)
    names = [n for n, _ in lm.named_modules() if n]
    for target in lora.target_modules if lora.target_modules != ["all-linear"] else []:
        one = peft_config(LMLoraConfig(r=lora.r, target_modules=[target]))
        if not any(check_target_module_exists(one, n) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(f"model.lm.lora.target_modules: {target!r} matches no module of the LM "
                              f"({type(lm).__name__}; its linear layers: {', '.join(leaves)})")
    _inject(lm, lora, low_cpu_mem_usage=True)


def lora_parameter_names(model: nn.Module) -> list:
    """The model's LoRA tensors, as its exports name them: the LM's trainables (it has no others)."""
    return [n for n, _ in model.trainable_named_parameters() if n.startswith("captioner.lm.")]


def add_lora(model: nn.Module) -> int:
    """``model.lm.lora`` into ``model.captioner.lm`` (built, its weights loaded): adapters in fp32 (as
    peft's ``PeftModel`` keeps them, whatever the LM's dtype), trainable; everything else of the LM
    stays frozen. Returns the number of LoRA parameters. No-op without LoRA or without an LM (stage 1)."""
    from peft.tuners.tuners_utils import cast_adapter_dtype

    from msmedcap.models.encoders import fixed_seed

    lora, lm = model.cfg.lm.lora, model.captioner.lm
    if lora is None or lm is None:
        return 0
    with fixed_seed(1):  # the adapters' random init (A; B starts at zero) is the same in every build
        tuner = _inject(lm, lora)
    cast_adapter_dtype(lm, ADAPTER)
    # held outside the module tree (its parameters are the LM's), for merge_lora
    model.captioner.__dict__["lora_tuner"] = tuner
    model.note_trainables()
    count = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %d trainable parameters", lora.r, lora.alpha,
             ", ".join(sorted(tuner.peft_config[ADAPTER].target_modules)), count)
    return count


def adapter_modules(lm) -> nn.ModuleDict:
    """The modules that directly own the LM's trainable (LoRA) parameters, under names without dots:
    how an engine can see them while the frozen LM itself is kept out of its sight."""
    owners = nn.ModuleDict()
    for name, module in (lm.named_modules() if lm is not None else ()):
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            owners[name.replace(".", "__")] = module
    return owners


def merge_lora(model: nn.Module) -> int:
    """The LoRA folded into the LM's weights (peft's ``merge_and_unload``): the LM's own modules again,
    its adapters no longer trainables of the model. For inference (an export is written from the
    unmerged model). Returns the number of LoRA parameters merged."""
    tuner = model.captioner.__dict__.pop("lora_tuner", None)
    if tuner is None:
        return 0
    count = sum(p.numel() for p in model.captioner.lm.parameters() if p.requires_grad)
    model.captioner.lm = tuner.merge_and_unload()  # the same LM object, adapted modules swapped back
    model.note_trainables()
    return count
