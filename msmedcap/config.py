"""One typed configuration for model, data, training and evaluation.

A run's config = a YAML preset (packaged under ``msmedcap/presets`` or a file path) plus
``section.key=value`` overrides from the command line. Everything is checked before any work
starts: unknown keys, wrong types and missing files raise :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from msmedcap.checks import AT_LEAST_0, AT_LEAST_1, POSITIVE
from msmedcap.data.clip_preprocess import clip_preprocess, has_schema
from msmedcap.data.shard_spec import check_local_shards, expand_braces, parse_shard_spec
from msmedcap.errors import ConfigError, ConfigWarning  # noqa: F401  (the config's errors, re-exported)
from msmedcap.models.clip_settings import ClipConfig
from msmedcap.models.lm_settings import LMConfig, pretrained_config
from msmedcap.models.qformer_settings import QFormerConfig
from msmedcap.models.sam_settings import SamConfig
from msmedcap.models.stage1_settings import Stage1Config
from msmedcap.paths import resolve_asset
from msmedcap.train.validation_settings import check_validation_config

PRESET_DIR = Path(__file__).parent / "presets"
# The encoder branches: each has a config section model.<branch> (a field of ModelConfig below) and an
# EncoderSpec in msmedcap.registry (its encoder, transform, batch keys, cache identity).
BRANCHES = ("clip", "sam")
VARIANT_BRANCHES = {"blip2": ("clip",), "sam-blip2": ("sam",), "msmedcap": ("clip", "sam")}


# --------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    variant: Literal["blip2", "sam-blip2", "msmedcap"] = "msmedcap"
    clip: ClipConfig = field(default_factory=ClipConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)  # stage 1's objectives (models/stage1_settings.py)
    # Mixed semantic pretraining: which branches each sample's domain trains in stage 1.
    routing: dict = field(default_factory=lambda: {"general": ["clip", "sam"], "medical": ["sam"]})
    # Frozen encoders' dtype: auto = fp16 on GPU, bf16 on CPU.
    frozen_dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    blip2_checkpoint: Optional[str] = None  # HF-format BLIP-2 directory imported into the CLIP branch
    # Directory caching frozen-encoder outputs by image sha256 (models/feature_cache.py); None = off;
    # auto = the run's own, OUTPUT_DIR/feature-cache, while training (the trainer sets it; elsewhere off).
    feature_cache: Optional[str] = None
    # Build frozen parts that have no weights (SAM without sam.checkpoint, CLIP without clip.pretrained, an LM
    # from a bare lm.config) with random weights: for tests and benchmarks, which measure shapes. Off: such a
    # config is refused before any work (random_frozen_parts names each key and the file to set).
    allow_random_weights: bool = False

    @property
    def branches(self) -> tuple:
        return VARIANT_BRANCHES[self.variant]

    @property
    def feature_cache_dir(self) -> Optional[str]:
        """Where the feature cache is; None when off, or ``auto`` before a trainer resolves it."""
        return None if self.feature_cache in (None, "auto") else self.feature_cache


# --------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    # Weighted shard specs "PATTERN::WEIGHT" (brace expansion, weight optional = 1).
    train: list = field(default_factory=lambda: [
        "shards/demo/general-train-{000..003}.tar::1", "shards/demo/medical-train-{000..003}.tar::1"])
    eval: list = field(default_factory=lambda: [
        "shards/demo/general-eval-000.tar", "shards/demo/medical-eval-000.tar"])
    # Held-out shard specs scored during training every train.eval_every steps (msmedcap.train.validation);
    # empty = no validation. Keep them apart from data.eval: choosing the best step on them tunes on them.
    val: list = field(default_factory=list)
    num_workers: int = 2
    # Train shuffle: at most shuffle_buffer raw (encoded) samples per worker, first yield once
    # shuffle_initial are in (at most shuffle_buffer); memory per worker: msmedcap.data.memory.
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    max_image_pixels: int = 50_000_000  # decompression-bomb cap; larger images are skipped and counted
    # The train stream redraws its shards every segment_batches batches per worker (seeded by the
    # segment's index): a resumed run re-reads at most this many batches to reach its position.
    segment_batches: int = 50
    # JPEG decode at a reduced DCT scale (PIL draft: 1/2, 1/4, 1/8) when every encoder's image stays at
    # least jpeg_draft x its own size; 0 = off (exact: the pixels of a full decode). Opt-in: the
    # result differs from a full decode by a few grey levels (docs/benchmarks.md).
    jpeg_draft: float = 0.0
    # Decode JPEGs on the GPU (torchvision.io.decode_jpeg, nvJPEG) and resize them there; workers then
    # only parse headers. Needs CUDA; outputs within a few grey levels of the CPU path (docs/benchmarks.md).
    gpu_decode: bool = False
    # Workers only decode: uint8 at the native size crosses (padded to the batch's largest h/w, with each
    # image's size), and each encoder's resize (PIL's filters, antialiased; within 3 grey levels of the
    # worker path, mostly equal), normalisation and padding run on the trainer's device (data.transforms.resize_pending).
    # Not with jpeg_draft or gpu_decode. More bytes cross for sources larger than the encoders' inputs.
    resize_on_device: bool = False


# --------------------------------------------------------------------------- training
@dataclass
class StageConfig:
    steps: int = 1000
    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    stage: Literal["1", "2", "all"] = "all"
    output_dir: str = "runs/demo"
    seed: int = 42
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # trainables; auto = bf16 (fp16 where no bf16)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2
    eval_at_end: bool = True
    # torch.distributed timeout: how long a rank waits in a collective for a silent (hung) peer before
    # it fails with an error. A dead peer is detected at once (its connections close); see
    # docs/reliability.md. Longer than any legitimate wait (a checkpoint write, an uneven eval share).
    dist_timeout_s: int = 600
    # Recompute each Q-Former and LM layer in the backward instead of keeping its activations
    # (non-reentrant, so ITG's gradient through the reused query keys/values survives).
    activation_checkpointing: bool = False
    # Memory per rank the preflight plans each stage for before its engine is built (msmedcap.bench.plan):
    # null = the GPU's own memory on a GPU, no preflight on a CPU.
    memory_limit_gib: Optional[float] = None
    # Validation on data.val (msmedcap.train.validation, docs/validation.md): every eval_every steps (and at a
    # stage's last step) the stage's losses; every eval_generate_every steps (a multiple of eval_every) also
    # greedy captions scored (CIDEr, findings; stage 2). 0 = off.
    eval_every: int = 0
    eval_generate_every: int = 0
    # METRIC:max|min (e.g. val/cider:max, val/loss:min): stageN/best/ holds the export of the best step so far.
    keep_best_by: Optional[str] = None
    # Stop a stage after this many validations in a row without a new best of keep_best_by; 0 = never.
    early_stop_patience: int = 0


# --------------------------------------------------------------------------- evaluation
@dataclass
class ImageclefConfig:
    """Local weights and files of the ImageCLEFmedical caption protocol (msmedcap.eval.imageclef);
    a part without them is skipped and scores.json says why."""
    bertscore_model: Optional[str] = None  # a transformers model directory (microsoft/deberta-xlarge-mnli in the task)
    bertscore_layers: Optional[int] = None  # None: bert-score's layer for that model name, else the last layer
    clip_model: Optional[str] = None  # open_clip model name or config JSON (BiomedCLIP in practice)
    clip_pretrained: Optional[str] = None  # its weights file
    images: Optional[str] = None  # directory of KEY.jpg / KEY.png, as the task's evaluator reads them
    concepts: Optional[str] = None  # reference CUIs, the concept-detection task's CSV (ID,CUI;CUI)
    concepts_predicted: Optional[str] = None  # predicted CUIs, the task's submission CSV


@dataclass
class EvalConfig:
    protocol: Literal["coco", "imageclef"] = "coco"  # imageclef: the coco scores plus the ImageCLEF block
    imageclef: ImageclefConfig = field(default_factory=ImageclefConfig)
    batch_size: int = 16
    num_beams: int = 5
    min_len: int = 8
    max_len: int = 30
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    max_samples: int = 0  # 0 = all
    gallery: bool = True
    val_max_samples: int = 0  # validation during training: the first N samples of data.val (0 = all)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in allowed:
            value = str(value)  # `train.stage=1` parses as int
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    if tp is list:
        if isinstance(value, (str, tuple)):
            value = [value] if isinstance(value, str) else list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    return value


# Keys removed from the config that configs written before (an export's config.yaml) still carry,
# with the one value they may have there: dropped on load; any other value is refused.
RETIRED_KEYS: dict = {}


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in [n for n in data if (f"{prefix}.{n}" if prefix else n) in RETIRED_KEYS]:
        key = f"{prefix}.{name}" if prefix else name
        value, why = RETIRED_KEYS[key]
        if data[name] != value:
            raise ConfigError(f"{key} was removed: {why}")
        data = {k: v for k, v in data.items() if k != name}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        if "lora" in unknown and prefix.startswith("model"):  # e.g. model.clip.lora: only the LM takes adapters
            raise ConfigError(f"{where}lora: LoRA adapts the language model only (model.lm.lora); the image encoders "
                              "stay frozen and the Q-Formers are trained whole")
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (known keys there: {', '.join(sorted(names))})")
    obj = cls()
    for name, value in data.items():
        setattr(obj, name, _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name))
    return obj


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    packaged = PRESET_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r} (presets: {', '.join(names)}; or a .yaml path)")
    return packaged


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("inherit", None)  # a preset may build on another preset
    if base:
        data = _merge(_read_yaml(preset_path(base)), data)
    return data


def parse_override(text: str) -> dict:
    """``model.qformer.num_layers=2`` -> nested dict; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_config(preset: str = "demo", overrides: Optional[list] = None, check_files: bool = True) -> Config:
    """Preset (name or YAML path) + overrides -> a validated :class:`Config`."""
    data = _read_yaml(preset_path(preset))
    for ov in overrides or []:
        data = _merge(data, parse_override(ov))
    cfg = _build(Config, data)
    validate(cfg, check_files=check_files)
    return cfg


def config_from_dict(data: dict, check_files: bool = False) -> Config:
    cfg = _build(Config, data)
    validate(cfg, check_files=check_files)
    return cfg


# --------------------------------------------------------------------------- validation
def _is_hub_name(path: str) -> bool:
    # "facebook/opt-2.7b" or "bert-base-uncased": not a local path, resolved by the library's loader.
    return not path.startswith((".", "/", "~")) and not os.path.exists(path) and path.count("/") <= 1


# Numeric ranges of the data, train and eval sections, checked before any work: (dotted key, test, what is
# allowed). The model's components check their own (msmedcap.models.*_settings).
BOUNDS = [
    *[(f"train.{st}.{k}", *b) for st in ("stage1", "stage2") for k, b in (
        ("lr", POSITIVE), ("min_lr", AT_LEAST_0), ("warmup_lr", AT_LEAST_0), ("warmup_steps", AT_LEAST_0),
        ("weight_decay", AT_LEAST_0), ("grad_clip", AT_LEAST_0),
        ("steps", AT_LEAST_1), ("micro_batch_size", AT_LEAST_1), ("grad_accum", AT_LEAST_1))],
    *[(f"data.{k}", *AT_LEAST_1) for k in ("shuffle_buffer", "shuffle_initial", "segment_batches", "max_image_pixels")],
    ("data.num_workers", *AT_LEAST_0),
    ("data.jpeg_draft", (lambda v: v == 0 or 1 <= v < float("inf")), "0 (off) or >= 1"),
    ("train.log_every", *AT_LEAST_1), ("train.ckpt_every", *AT_LEAST_1), ("train.keep_last", *AT_LEAST_1),
    ("train.memory_limit_gib", (lambda v: v is None or v > 0), "> 0 or null (the GPU's memory)"),
    ("eval.batch_size", *AT_LEAST_1), ("eval.num_beams", *AT_LEAST_1), ("eval.max_len", *AT_LEAST_1),
    ("eval.min_len", *AT_LEAST_0), ("eval.repetition_penalty", *POSITIVE), ("eval.max_samples", *AT_LEAST_0),
    ("eval.val_max_samples", *AT_LEAST_0), ("train.eval_every", *AT_LEAST_0),
    ("train.eval_generate_every", *AT_LEAST_0), ("train.early_stop_patience", *AT_LEAST_0),
    ("train.dist_timeout_s", *AT_LEAST_1),
    ("eval.imageclef.bertscore_layers", (lambda v: v is None or v >= 1), ">= 1 or null"),
    ("train.seed", (lambda v: 0 <= v < 2**32), "in [0, 2**32) (numpy's seed range)"),
]
# Strings that may be empty; every other str / Optional[str] field must be non-empty when set.
EMPTY_STRING_OK = {"model.lm.prompt"}
def config_fields(cls=None, prefix: str = "") -> dict:
    """Every leaf field of the config: dotted key -> annotation (nested dataclasses walked, optional
    sections such as model.lm.lora too)."""
    cls = cls or Config
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        section = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        if len(section) == 1 and dataclasses.is_dataclass(section[0]):
            out.update(config_fields(section[0], key + "."))
        else:
            out[key] = tp
    return out


def _check_fields(cfg: "Config") -> None:
    """What every field must be, whatever its section: a finite number, a non-empty string (unless
    EMPTY_STRING_OK). Each error names the dotted key and what is allowed."""
    import math

    for key, tp in config_fields().items():
        value = _dotted(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if isinstance(value, str) and not value.strip() and key not in EMPTY_STRING_OK:
            optional = typing.get_origin(tp) is typing.Union
            raise ConfigError(f"{key} must be a non-empty string{' or null' if optional else ''}, got {value!r}")


def _dotted(cfg, key: str):
    """The value at ``key``; None inside an optional section that is not set."""
    value = cfg
    for part in key.split("."):
        value = None if value is None else getattr(value, part)
    return value


def random_frozen_parts(m: ModelConfig) -> dict:
    """The frozen parts ``m`` would build with random weights: ``{key to set: what to set it to}``
    (empty when every frozen part of its variant has weights). The CLIP tower and the LM count as having
    weights when ``blip2_checkpoint`` provides them (msmedcap.models.loading.import_blip2 then checks that
    it provides every tensor)."""
    out = {}
    for missing in (m.sam.missing_weights() if "sam" in m.branches else None,
                    m.clip.missing_weights() if "clip" in m.branches and not m.blip2_checkpoint else None):
        if missing:
            out[missing[0]] = missing[1]
    if not m.lm.name_or_path and not m.blip2_checkpoint:
        out["model.lm.name_or_path"] = ("an LM name or directory (facebook/opt-2.7b, google/flan-t5-xl, ...); "
                                        "model.lm.config alone "
                                        "builds a random LM")
    return out


def check_weights_given(m: ModelConfig) -> None:
    """A frozen part without weights is a configuration error unless ``model.allow_random_weights``."""
    missing = random_frozen_parts(m)
    if missing and not m.allow_random_weights:
        parts = "; ".join(f"{k} must be set, to {what}" for k, what in missing.items())
        raise ConfigError(f"a frozen part without weights would be random: {parts}. (For tests and benchmarks "
                          "only, model.allow_random_weights=true builds such parts random.)")


def validate(cfg: Config, check_files: bool = True) -> None:
    m, t = cfg.model, cfg.train
    for key, ok, allowed in BOUNDS:
        value = _dotted(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    _check_fields(cfg)
    m.clip.check()
    m.sam.check()
    m.qformer.check()
    m.stage1.check()
    m.lm.check(m.qformer.num_query_tokens, len(m.branches))
    for domain, branches in m.routing.items():
        if domain not in ("general", "medical"):
            raise ConfigError(f"model.routing: unknown domain {domain!r} (general, medical)")
        if not (isinstance(branches, list) and all(isinstance(b, str) and b in BRANCHES for b in branches)
                and len(set(branches)) == len(branches)):
            raise ConfigError(f"model.routing.{domain}: expected a list of distinct branches from {BRANCHES}, "
                              f"got {branches!r}")
    if cfg.data.resize_on_device and (cfg.data.jpeg_draft or cfg.data.gpu_decode):
        raise ConfigError("data.resize_on_device: not with data.jpeg_draft or data.gpu_decode (each changes where "
                          "and from what the encoders' images are resized); set one of them")
    if "sam" in m.branches and m.sam.preprocess == "medsam" and (cfg.data.resize_on_device or cfg.data.gpu_decode
                                                                  or cfg.data.jpeg_draft):
        import warnings

        warnings.warn("model.sam.preprocess=medsam: with data.resize_on_device, data.gpu_decode or data.jpeg_draft the "
                      "SAM images are not resized as MedSAM's script does (skimage's spline in the workers): close, not "
                      "equal (docs/encoders.md)", ConfigWarning, stacklevel=2)
    for name, st in (("stage1", t.stage1), ("stage2", t.stage2)):
        betas = st.betas
        if not (isinstance(betas, list) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"train.{name}.betas must be two numbers in [0, 1), got {betas!r}")
        if st.min_lr > st.lr:
            raise ConfigError(f"train.{name}.min_lr must be <= train.{name}.lr")
        if st.warmup_steps > st.steps:  # legal (the lr never reaches its peak), rarely meant: say so
            import warnings

            warnings.warn(f"train.{name}.warmup_steps ({st.warmup_steps}) > train.{name}.steps ({st.steps}): "
                          f"the learning rate never reaches train.{name}.lr", ConfigWarning, stacklevel=2)
    if cfg.eval.min_len > cfg.eval.max_len:
        raise ConfigError("eval.min_len must be <= eval.max_len")
    check_weights_given(m)
    check_validation_config(cfg)
    if not check_files:
        return
    if "clip" in m.branches and has_schema(m.clip.name):

        clip_preprocess(m.clip)  # the repository's or folder's preprocess_cfg: readable, one open_clip applies
    for section in ("train", "eval", "val"):
        for spec in getattr(cfg.data, section):
            parsed = parse_shard_spec(spec)
            paths = expand_braces(parsed.pattern)
            check_local_shards(f"data.{section}", [spec])
            if parsed.domain is None:  # samples without a domain would be skipped forever: say so now
                from msmedcap.data.shards import check_spec_has_domain

                check_spec_has_domain(f"data.{section}", spec, paths)
    files = {
        "model.clip.pretrained": (resolve_asset(m.clip.pretrained) if m.clip.pretrained
                                  and os.sep in m.clip.pretrained else None),
        "model.sam.checkpoint": m.sam.checkpoint and resolve_asset(m.sam.checkpoint),
        "model.blip2_checkpoint": m.blip2_checkpoint,
        **{f"model.{b}.stage1_checkpoint": getattr(m, b).stage1_checkpoint and resolve_asset(getattr(m, b).stage1_checkpoint)
           for b in BRANCHES},
    }
    if cfg.eval.protocol == "imageclef":  # their contents are checked where scoring starts (eval.imageclef)
        files.update({f"eval.imageclef.{k}": v for k, v in dataclasses.asdict(cfg.eval.imageclef).items()
                      if k not in ("bertscore_layers", "clip_model")})
    for key, path in files.items():
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: file not found: {path}")
    for key, path in {"model.qformer.tokenizer": m.qformer.tokenizer, "model.lm.tokenizer": m.lm.tokenizer,
                      "model.qformer.init_from": m.qformer.init_from, "model.lm.name_or_path": m.lm.name_or_path,
                      "model.clip.name": m.clip.name if m.clip.name.endswith(".json") else None}.items():
        if path and not _is_hub_name(path) and not os.path.exists(resolve_asset(path)):
            raise ConfigError(f"{key}: not found: {path}")
    if m.lm.name_or_path and os.path.isdir(resolve_asset(m.lm.name_or_path)):  # its family, before any work
        pretrained_config(m.lm.name_or_path)


