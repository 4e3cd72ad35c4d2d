"""A self-contained model directory for every variant: ``config.json`` (the run's config with every
weight path replaced by what the directory holds), ``model.safetensors`` (every tensor: trainables and
frozen parts), the two tokenizers, and an open_clip model-config file when the CLIP tower was given by one.
It needs no original weight file to load: :func:`load_bundle` (``msmedcap.from_pretrained``), and
``msmedcap caption`` / ``msmedcap evaluate --checkpoint`` take it as they take an export."""
from __future__ import annotations

import copy
import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from msmedcap.config import Config, ConfigError, config_from_dict, resolve_asset
from msmedcap.models.lora import lora_parameter_names

log = logging.getLogger(__name__)

FORMAT = "msmedcap-model"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
QFORMER_TOKENIZER, LM_TOKENIZER = "qformer_tokenizer", "lm_tokenizer"


def is_bundle(path) -> bool:
    p = Path(path)
    if not (p / CONFIG).is_file() or not (p / WEIGHTS).is_file():
        return False
    try:
        return json.loads((p / CONFIG).read_text()).get("format") == FORMAT
    except ValueError:
        return False


def check_bundle_lm(cfg: Config) -> None:
    """The bundle writes the LM's architecture as OPTConfig arguments (:func:`lm_architecture`): another LM
    family is refused before any work (the run's own export, which names the LM's directory, serves it)."""
    from msmedcap.models.lm_families import model_type

    kind = model_type(cfg.model)
    if kind != "opt":
        raise ConfigError(f"export --bundle: model.lm is {kind!r}; a bundle holds an OPT LM only. Use the run's export "
                          "directory (stage2/export) with msmedcap caption / evaluate, which loads the LM from "
                          "model.lm.name_or_path")


def lm_architecture(config) -> dict:
    """``model.lm.config`` of the built OPT: every OPTConfig argument with a plain value (vocabulary and
    special tokens included, so the tokenizer's length does not decide them)."""
    import inspect

    from transformers import OPTConfig

    args = set(inspect.signature(OPTConfig.__init__).parameters) - {"self", "kwargs"} - _NOT_ARCHITECTURE
    return {k: v for k, v in config.to_dict().items()
            if k in args and (v is None or isinstance(v, (bool, int, float, str)))}


_NOT_ARCHITECTURE = {"transformers_version", "dtype", "torch_dtype", "output_hidden_states", "output_attentions",
                     "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type"}


def bundle_config(model, cfg: Config) -> dict:
    """The config a bundle stores: weights from ``model.safetensors`` alone (no original file, no
    warm start, no feature cache), the LM's architecture written out, tokenizers and the open_clip
    model config as names inside the directory."""
    data = copy.deepcopy(cfg.to_dict())
    m = data["model"]
    m["lm"].update(name_or_path=None, config=lm_architecture(model.captioner.lm.config), tokenizer=LM_TOKENIZER)
    if not lora_parameter_names(model):
        m["lm"]["lora"] = None  # merged into the LM's weights (models.lora.merge_lora): the LM is plain again
    m["qformer"].update(tokenizer=QFORMER_TOKENIZER, init_from=None)
    m["clip"]["pretrained"] = None
    if m["clip"]["name"].endswith(".json"):
        m["clip"]["name"] = Path(resolve_asset(m["clip"]["name"])).name
    m["sam"]["checkpoint"] = None
    for branch in ("clip", "sam"):
        m[branch]["stage1_checkpoint"] = None
    m.update(blip2_checkpoint=None, feature_cache=None, allow_random_weights=True)  # every tensor is in WEIGHTS
    return data


def write_bundle(model, cfg: Config, out_dir: Path) -> dict:
    """Write the bundle into ``out_dir`` (exists, empty); -> facts for the card."""
    from safetensors.torch import save_model

    from msmedcap.tokenization import load_lm_tokenizer, load_qformer_tokenizer

    out_dir = Path(out_dir)
    data = bundle_config(model, cfg)
    if cfg.model.clip.name.endswith(".json") and "clip" in model.branches:
        shutil.copyfile(resolve_asset(cfg.model.clip.name), out_dir / data["model"]["clip"]["name"])
    load_qformer_tokenizer(cfg.model.qformer.tokenizer).save_pretrained(out_dir / QFORMER_TOKENIZER)
    load_lm_tokenizer(cfg.model.lm.tokenizer).save_pretrained(out_dir / LM_TOKENIZER)
    # save_model drops the copies of shared tensors (OPT's tied LM head), as load_model expects
    save_model(model, str(out_dir / WEIGHTS), metadata={"format": FORMAT, "variant": cfg.model.variant})
    (out_dir / CONFIG).write_text(json.dumps({"format": FORMAT, "model_type": "msmedcap", "variant": cfg.model.variant,
                                              "config": data}, indent=2))
    return {"format": "bundle"}


def _absolute(data: dict, directory: Path) -> dict:
    m = data["model"]
    m["lm"]["tokenizer"] = str(directory / m["lm"]["tokenizer"])
    m["qformer"]["tokenizer"] = str(directory / m["qformer"]["tokenizer"])
    if m["clip"]["name"].endswith(".json"):
        m["clip"]["name"] = str(directory / m["clip"]["name"])
    return data


# What building the frozen parts empty logs, false here: they are filled from the bundle at once.
_BUILD_NOISE = ("RANDOM WEIGHTS", "No pretrained weights loaded")


@contextmanager
def _no_random_weight_warnings():
    """msmedcap's RANDOM WEIGHTS warning and open_clip's "No pretrained weights loaded" (root logger)
    silenced while the model is built empty."""
    loggers = [logging.getLogger("msmedcap.models.encoders"), logging.getLogger()]

    def keep(record) -> bool:
        return not record.getMessage().startswith(_BUILD_NOISE)

    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


def stored_config(path) -> Config:
    """The Config of a bundle, its tokenizer and model-config names made absolute."""
    directory = Path(path)
    if not is_bundle(directory):
        raise ConfigError(f"{path}: not an msmedcap model directory ({CONFIG} with format {FORMAT!r} + {WEIGHTS})")
    return config_from_dict(_absolute(json.loads((directory / CONFIG).read_text())["config"], directory))


def load_bundle(path) -> tuple:
    """A bundle directory -> (MSMedCap in eval mode, its Config). Every tensor comes from
    ``model.safetensors`` and must be there (none missing, none in excess, same shapes)."""
    from safetensors.torch import load_model

    from msmedcap.models.loading import build_model

    directory = Path(path)
    cfg = stored_config(directory)
    with _no_random_weight_warnings():
        model = build_model(cfg.model, init_trainables=False)
    try:
        load_model(model, str(directory / WEIGHTS), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{directory / WEIGHTS} does not fit the model of its {CONFIG}: {str(e)[:800]}") from None
    return model.eval(), cfg
