"""MSMedCap: frozen CLIP/SAM encoders -> Q-Formers -> frozen LM, the three variants from one code path.

``variant`` picks the branches (blip2 = CLIP, sam-blip2 = SAM, msmedcap = both). Stage 1 trains each
branch's Q-Former on the samples whose ``domain`` routes to it (``cfg.routing``); every frozen encoder
runs once per batch on exactly those samples, shared by ITC/ITM/ITG. Stage 2 and generation run every
branch on every sample.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from msmedcap.batch import DOMAINS
from msmedcap.config import ModelConfig, check_weights_given, random_frozen_parts
from msmedcap.models.captioner import Captioner
from msmedcap.models.lm_families import caption_end
from msmedcap.data.transforms import NATIVE_KEY, resize_pending
from msmedcap.models.feature_cache import KEY as CACHE_KEY, batch_rows
from msmedcap.models.encoders import DTYPES, built_in, fixed_seed, frozen_dtype, warn_random
from msmedcap.models.qformer import QFormer
from msmedcap.models.counterfactuals import counterfactual_texts
from msmedcap.models.stage1 import stage1_branch_loss, touch
from msmedcap.registry import encoder_spec
from msmedcap.tokenization import encode_qformer_text, load_lm_tokenizer, load_qformer_tokenizer

log = logging.getLogger(__name__)

# What the stage-2 captioning loss reaches inside a Q-Former (``qformers.<branch>.`` + this): the query
# path (learned queries, the token adapter, ln_vision, the embedding LayerNorm, self-attention,
# cross-attention, query FFN).
# The text side (embeddings, text FFN) and the stage-1 heads (ITC projections, temp, ITM, ITG) are not.
# tests/integration/test_stage_scope.py checks this rule against autograd on a real batch.
STAGE2_QFORMER = re.compile(r"(query_tokens|adapter\.|ln_vision\.|bert\.layernorm\."
                            r"|bert\.encoder\.layer\.\d+\.(attention|crossattention|intermediate_query|output_query)\.)")


def lm_dtype(cfg: ModelConfig) -> torch.dtype:
    """The frozen LM's dtype: ``model.lm.dtype``, or without one (auto: no engine to follow, as when
    evaluating a config that was never trained here) the frozen encoders' ``frozen_dtype``."""
    return frozen_dtype(cfg.frozen_dtype) if cfg.lm.dtype == "auto" else DTYPES[cfg.lm.dtype]


class MSMedCap(nn.Module):
    """``with_lm=False`` builds everything but the frozen LM (stage 1 never runs it)."""

    def __init__(self, cfg: ModelConfig, with_lm: bool = True):
        super().__init__()
        self.cfg = cfg
        self.branches = tuple(cfg.branches)
        check_weights_given(cfg)  # config validation did already; a ModelConfig built in code too
        dtype = frozen_dtype(cfg.frozen_dtype)
        qtok = load_qformer_tokenizer(cfg.qformer.tokenizer)
        self.dec_token_id = qtok.bos_token_id
        self.counterfactuals = cfg.stage1.counterfactuals.build()  # None when off
        self._qformer_tokenizer = qtok  # the counterfactuals' text, tokenised as the loader tokenises captions
        with fixed_seed(), built_in(dtype):  # each frozen part built and loaded in its run dtype (no fp32 copy)
            self.encoders = nn.ModuleDict({b: encoder_spec(b).build(getattr(cfg, b)).freeze(dtype) for b in self.branches})
        self.qformers = nn.ModuleDict({
            b: QFormer(cfg.qformer, self.encoders[b].width, len(qtok), qtok.pad_token_id,
                       ln_vision=getattr(cfg, b).ln_vision, token_mlp=getattr(getattr(cfg, b), "token_mlp", 0))
            for b in self.branches})
        lm_tok = load_lm_tokenizer(cfg.lm.tokenizer)
        self.captioner = Captioner(cfg.lm, {b: cfg.qformer.hidden_size for b in self.branches}, lm_tok,
                                   lm_dtype(cfg), caption_end(cfg, lm_tok), with_lm=with_lm)
        parts = {"model.sam": f"SAM {cfg.sam.type} image encoder", "model.clip": f"CLIP tower {cfg.clip.name}",
                 "model.lm": "LM"}  # by section: the key within it depends on how the part is named
        for key in random_frozen_parts(cfg):  # refused by config validation unless model.allow_random_weights
            if with_lm or key != "model.lm.name_or_path":
                warn_random(parts[key.rsplit(".", 1)[0]], key)
        # routing[d, i] = samples of domain d train branch i in stage 1
        routing = [[b in cfg.routing.get(d, []) for b in self.branches] for d in DOMAINS]
        self.register_buffer("routing", torch.tensor(routing, dtype=torch.bool), persistent=False)
        self.feature_cache = None  # a models.feature_cache.FeatureCache when model.feature_cache is set
        # The model's trainables (exported, loaded, hashed, whatever the stage): fixed here. A stage trains
        # a subset of them (set_stage); the others are frozen for that stage only.
        self.note_trainables()
        self._held: dict = {}  # stage-frozen trainables' values while an engine may cast them (set_stage)
        self.stage = None
        name = lambda t: str(t).replace("torch.", "")  # noqa: E731
        log.info("model %s: frozen encoders in %s, frozen LM in %s; trainables in %s (the engine casts them to "
                 "train.precision)", cfg.variant, name(dtype),
                 name(lm_dtype(cfg)) if with_lm else "- (not built: stage 1 does not use it)",
                 name(self.qformers[self.branches[0]].dtype))

    # ----------------------------------------------------------------- parameters
    def train(self, mode: bool = True):
        super().train(mode)  # encoders and the LM override train() and stay in eval mode
        return self

    def note_trainables(self) -> None:
        """Fix the model's trainables: the parameters that require a gradient now (at build, before any
        stage scopes them; again when LoRA adapters are added to the LM or merged into it)."""
        self._trainable_names = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def frozen_parts(self) -> list:
        """``(parent, name)`` of each frozen module: the image encoders and, when built, the LM."""
        parts = [(self, "encoders")]
        if self.captioner.lm is not None:
            parts.append((self.captioner, "lm"))
        return parts

    @contextmanager
    def without_frozen_parts(self):
        """The frozen encoders and LM out of the module tree (same order after): a DeepSpeed engine casts
        and moves every parameter it can see, and would leave the frozen weights rounded to its dtype."""
        from msmedcap.models.lora import adapter_modules

        parts = [(parent, name, parent._modules[name]) for parent, name in self.frozen_parts()]
        adapters = adapter_modules(self.captioner.lm)  # the LM's LoRA stays in sight: it trains
        for parent, name, _ in parts:
            parent._modules[name] = None  # a None child keeps its place and owns no parameters
        if len(adapters):
            self.captioner._modules["lm_adapters"] = adapters
        try:
            yield
        finally:
            self.captioner._modules.pop("lm_adapters", None)
            for parent, name, module in parts:
                parent._modules[name] = module

    def frozen_to(self, device) -> None:
        """The frozen parts onto ``device`` in their own dtypes (what the engine did for the rest)."""
        for parent, name in self.frozen_parts():
            parent._modules[name].to(device)

    def restore_held(self) -> None:
        """A bf16/fp16 engine casts every trainable it wraps; the ones frozen for this stage go back to
        the values and dtype they had at :meth:`set_stage` (unrounded, so a stage leaves them
        bit-identical). No optimizer state holds any of them, so this is safe after
        ``deepspeed.initialize``."""
        params = dict(self.named_parameters())
        for name, value in self._held.items():
            params[name].data = value.to(params[name].device)
        self._held = {}

    def checkpoint_activations(self) -> int:
        """``train.activation_checkpointing``: the Q-Formers' and the LM's layers recompute their
        activations in the backward (msmedcap.models.checkpointing). Returns the number of layers."""
        from msmedcap.models.checkpointing import checkpoint_layers

        parts = [*self.qformers.values()] + ([self.captioner.lm] if self.captioner.lm is not None else [])
        return sum(checkpoint_layers(p) for p in parts)

    def trainable_named_parameters(self) -> list:
        """The model's trainables (Q-Formers with their heads, projections, soft prompts), in every
        stage: what save_trainable exports, load_trainable loads and weights_digest hashes."""
        params = dict(self.named_parameters())
        return [(n, params[n]) for n in self._trainable_names]

    @staticmethod
    def stage_trains(name: str, stage: int) -> bool:
        """Whether stage ``stage`` trains trainable ``name``: stage 1 the Q-Formers (every part, heads
        included); stage 2 what the captioning loss reaches: each Q-Former's query path
        (:data:`STAGE2_QFORMER`), the projections and the soft prompts."""
        top, _, rest = name.partition(".")
        if stage == 1:
            return top == "qformers"
        if stage == 2:
            return top == "captioner" or (top == "qformers" and STAGE2_QFORMER.match(rest.partition(".")[2]) is not None)
        raise ValueError(f"stage must be 1 or 2, not {stage!r}")

    def stage_named_parameters(self, stage: int) -> list:
        """The trainables stage ``stage`` trains: its optimizer's parameters."""
        return [(n, p) for n, p in self.trainable_named_parameters() if self.stage_trains(n, stage)]

    def set_stage(self, stage) -> None:
        """Train ``stage``'s parameters only: the other trainables get ``requires_grad=False`` (no
        gradient, no optimizer state, no weight decay) until the next call; ``None``: all trainable.
        Their values are held (on the host) so :meth:`restore_held` can undo an engine's cast."""
        self.stage = stage
        self._held = {}
        for name, p in self.trainable_named_parameters():
            trains = stage is None or self.stage_trains(name, stage)
            p.requires_grad_(trains)
            if not trains:
                self._held[name] = p.detach().to("cpu", copy=True)

    @staticmethod
    def part_of(name: str) -> str:
        top, sub = name.split(".")[:2]
        return {"encoders": f"{sub}_encoder", "qformers": f"{sub}_qformer"}.get(top) or sub

    def parameter_counts(self) -> dict:
        """``{part: {"trainable": n, "frozen": n}}`` for clip/sam encoder and Q-Former, lm, projections,
        soft_prompts, and ``total`` (trainable: the model's trainables, whatever the stage)."""
        trainable = set(self._trainable_names)
        counts: dict = {}
        for name, p in self.named_parameters():
            for part in (self.part_of(name), "total"):
                c = counts.setdefault(part, {"trainable": 0, "frozen": 0})
                c["trainable" if name in trainable else "frozen"] += p.numel()
        return counts

    def _touch_trainables(self) -> torch.Tensor:
        """0 x every parameter this stage trains: each step gives each of them a gradient (zero where
        unused, e.g. an unrouted branch's Q-Former in stage 1), so DDP / ZeRO gradient reduction never
        waits on a missing one. Trainables frozen for the stage are not touched. fp32, one element of each
        (``stage1.touch``): a whole-tensor fp16 sum can overflow, and 0 x inf would log the loss as NaN."""
        return touch(p for _, p in self.trainable_named_parameters() if p.requires_grad)

    def load_trainable(self, path, strict: bool = True, fresh=()) -> None:
        from msmedcap.models.weights_io import load_trainable

        load_trainable(self, Path(path), strict=strict, fresh=fresh)

    # ----------------------------------------------------------------- forward pieces
    @property
    def device(self) -> torch.device:
        return self.captioner.soft_prompts.device

    def encode(self, batch: dict, branch: str, index=None) -> torch.Tensor:
        """Frozen encoder tokens of ``batch[f"{branch}_image"]`` (rows ``index`` only if given), through
        the feature cache when one is attached and the batch carries image hashes."""
        spec = encoder_spec(branch)
        key = spec.image_key
        if key not in batch and NATIVE_KEY not in batch:
            raise KeyError(f"batch has no {key!r}: variant {self.cfg.variant} needs it")
        if batch.get("jpeg_bytes"):  # data.gpu_decode: JPEGs decoded and resized on this device, once
            from msmedcap.data.gpu_decode import decode_pending

            decode_pending(batch, {encoder_spec(b).image_key: self.encoders[b].transform for b in self.branches},
                           self.device)
        if NATIVE_KEY in batch:  # data.resize_on_device: this branch's resize on this device, once
            resize_pending(batch, {key: self.encoders[branch].transform}, self.device)
        images = batch[key].to(self.device, non_blocking=True)
        sizes = batch.get(spec.size_key)  # uint8 pixels: each image's (h, w); the encoder normalises and pads
        if index is not None:
            images = images[index]
            sizes = None if sizes is None else sizes[index.to(sizes.device)]
        if self.feature_cache is not None and CACHE_KEY in batch:
            keys = batch[CACHE_KEY] if index is None else [batch[CACHE_KEY][i] for i in index.tolist()]
            return self.feature_cache.encode(self.encoders[branch], branch, images, keys, sizes,
                                             found=batch_rows(batch, branch, index))
        return self.encoders[branch](images, sizes)

    def query_outputs(self, batch: dict = None, image_features: dict = None) -> dict:
        """Each branch's Q-Former query outputs; ``image_features`` (branch -> frozen encoder tokens)
        skips the encoders."""
        features = image_features or {b: self.encode(batch, b) for b in self.branches}
        return {b: q.queries(q.image_embeds(features[b].to(self.device))) for b, q in self.qformers.items()}

    # ----------------------------------------------------------------- stage 1
    def route(self, domain: torch.Tensor) -> torch.Tensor:
        """``[B, branches]`` bool: which branches each sample trains in stage 1."""
        return self.routing[domain.to(self.routing.device)]

    def stage1_loss(self, batch: dict, generator: torch.Generator = None) -> dict:
        """ITC + ITM + ITG of every branch on its routed samples. Returns ``loss`` and detached
        ``itc/itm/itg`` (summed over branches) and ``{branch}/{head}``."""
        routed = self.route(batch["domain"])
        ids = batch["text_input_ids"].to(self.device)
        mask = batch["text_attention_mask"].to(self.device)
        cf = None
        if self.counterfactuals is not None:
            settings = self.cfg.stage1.counterfactuals
            encode = partial(encode_qformer_text, self._qformer_tokenizer, max_len=self.cfg.qformer.max_text_len)
            cf = counterfactual_texts(self.counterfactuals, batch["caption"], encode, generator, settings.itm_share,
                                      settings.itc)
            cf = replace(cf, **{k: getattr(cf, k).to(self.device) for k in ("ids", "mask", "valid", "set_index")})
        total = self._touch_trainables()
        out = {}
        for i, b in enumerate(self.branches):
            index = routed[:, i].nonzero().squeeze(1).to(self.device)
            if index.numel():
                tokens = self.encode(batch, b, index)
            else:  # nothing routed here: no encoder call, empty tokens keep the shapes
                enc = self.encoders[b]
                tokens = torch.zeros(0, enc.num_tokens, enc.width, dtype=enc.dtype, device=self.device)
            losses = stage1_branch_loss(self.qformers[b], tokens, ids[index], mask[index], len(routed),
                                        self.dec_token_id, generator, max_text_len=self.cfg.qformer.max_text_len,
                                        counterfactuals=None if cf is None else cf.rows(index),
                                        skip_same_text=self.cfg.stage1.negatives_skip_same_text)
            for head, value in losses.items():
                if not head.startswith("n_"):  # counts, not losses
                    total = total + value * self.cfg.stage1.weight(head)
                out[f"{b}/{head}"] = value.detach()
                out[head] = out.get(head, 0.0) + value.detach()
        out["loss"] = total
        return out

    # ----------------------------------------------------------------- stage 2
    def stage2_loss(self, batch: dict, image_features: dict = None) -> dict:
        queries = self.query_outputs(batch, image_features)
        lm = self.captioner.loss(queries, batch["lm_input_ids"].to(self.device),
                                 batch["lm_attention_mask"].to(self.device))
        return {"loss": lm + self._touch_trainables(), "lm": lm.detach()}

    def caption_logits(self, batch: dict, image_features: dict = None) -> torch.Tensor:
        """Logits predicting each caption token of ``batch["lm_input_ids"]``."""
        return self.captioner.logits(self.query_outputs(batch, image_features),
                                     batch["lm_input_ids"].to(self.device), batch["lm_attention_mask"].to(self.device))

    @torch.no_grad()
    def generate(self, batch: dict, num_beams: int = 5, min_len: int = 8, max_len: int = 30,
                 repetition_penalty: float = 1.0, length_penalty: float = 1.0, image_features: dict = None) -> list:
        """Batched beam search; one caption per sample, cut at the first newline."""
        return self.captioner.generate(self.query_outputs(batch, image_features), num_beams=num_beams,
                                       min_len=min_len, max_len=max_len, repetition_penalty=repetition_penalty,
                                       length_penalty=length_penalty)
