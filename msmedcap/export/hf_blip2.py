"""The ``blip2`` variant as a transformers ``Blip2ForConditionalGeneration`` directory: the inverse of
msmedcap.models.loading.import_blip2, plus the files a user of transformers needs (``Blip2Processor``:
the LM tokenizer with BLIP-2's ``<image>`` token, an image processor doing open_clip's eval transform;
``generation_config.json`` with the run's generation settings).

What BLIP-2's layout can hold, and what is refused (:func:`check_expressible`, before any work):
- only the CLIP branch (variant ``blip2``);
- no soft prompts: the LM sees ``[soft prompts | queries | prompt]`` here, BLIP-2 ``[queries | text]``,
  and a prefix before the queries has no slot there;
- a CLIP tower BLIP-2's ``Blip2VisionModel`` computes: open_clip's timm EVA towers (EVA01-g-14, BLIP-2's
  own); open_clip's native ViTs have a LayerNorm before their first block (``ln_pre``) that it has no place
  for, and are refused;
- ``ln_vision`` on CLIP (it becomes the vision model's ``post_layernorm``).
The written model is then run against this one on random pixels and refused unless its logits agree
(:func:`check_logits`), so nothing that loads in transformers computes something else.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from msmedcap.config import Config, ConfigError
from msmedcap.models.lm_families import model_type as lm_model_type

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # Blip2Processor's placeholder, one per query, replaced by the projected queries
TRUNK = "encoders.clip.visual.trunk."
LOGITS_ATOL = 1e-3  # fp32 on both sides: differences are rounding (ln_vision's eps vs the tower's, sdpa vs eager)


def check_expressible(cfg: Config) -> None:
    """Refuse, from the config alone, what BLIP-2's layout cannot hold (the tower is checked on the built
    model by :func:`check_tower`)."""
    m = cfg.model
    if m.variant != "blip2":
        raise ConfigError(f"export --hf: variant {m.variant} has a SAM branch; transformers' Blip2ForConditionalGeneration "
                          "has one image encoder (CLIP). Export it with --bundle (msmedcap.from_pretrained loads it)")
    if m.lm.num_soft_prompts:
        raise ConfigError(f"export --hf: model.lm.num_soft_prompts={m.lm.num_soft_prompts}: the LM reads [soft prompts | "
                          "queries | prompt], BLIP-2's [queries | text]; a learned prefix before the queries has no place "
                          "in Blip2ForConditionalGeneration. Train with model.lm.num_soft_prompts=0 for a transformers "
                          "export, or export with --bundle")
    kind = lm_model_type(m)
    if kind != "opt":  # the image token's embedding row and the tied head below are OPT's names
        raise ConfigError(f"export --hf: model.lm is {kind!r}; this export writes BLIP-2 OPT's layout only. Export "
                          "with --bundle (msmedcap.from_pretrained loads it)")
    if m.clip.token_mlp:
        raise ConfigError(f"export --hf: model.clip.token_mlp={m.clip.token_mlp}: Blip2ForConditionalGeneration feeds "
                          "the tower's tokens to post_layernorm directly; a token adapter before it has no place. "
                          "Export with --bundle")
    if not m.clip.ln_vision:
        raise ConfigError("export --hf: model.clip.ln_vision=false: Blip2VisionModel always ends in a LayerNorm "
                          "(post_layernorm, BLIP-2's ln_vision); this model has none")


def check_tower(model) -> None:
    """The CLIP tower must be a timm EVA inside open_clip (BLIP-2's): ``Blip2VisionModel`` has no
    LayerNorm before the first block, no rotary embeddings, no layer scale, and one class token."""
    visual = model.encoders["clip"].visual
    trunk = getattr(visual, "trunk", None)
    name = model.cfg.clip.name
    if trunk is None:
        raise ConfigError(f"export --hf: model.clip.name={name} is an open_clip ViT: its ln_pre (a LayerNorm before the "
                          "first block) has no place in Blip2VisionModel, which BLIP-2 builds for EVA towers "
                          "(EVA01-g-14). Export it with --bundle")
    from timm.models.eva import Eva

    blocks = trunk.blocks
    problems = [what for what, bad in (
        ("not a timm Eva", not isinstance(trunk, Eva)),
        ("a LayerNorm before the first block", not isinstance(getattr(trunk, "norm_pre", torch.nn.Identity()),
                                                             torch.nn.Identity)),
        ("rotary position embeddings", getattr(trunk, "rope", None) is not None),
        (f"{getattr(trunk, 'num_prefix_tokens', 1)} prefix tokens (one class token only)",
         getattr(trunk, "num_prefix_tokens", 1) != 1),
        ("layer scale", any(getattr(b, "gamma_1", None) is not None for b in blocks)),
        ("no patch-embedding bias", trunk.patch_embed.proj.bias is None),
    ) if bad]
    if problems:
        raise ConfigError(f"export --hf: the CLIP tower {name} is not what Blip2VisionModel computes: "
                          f"{', '.join(problems)}. Export it with --bundle")


def hf_config(model, image_token_index: int):
    """The ``Blip2Config`` of ``model`` (vision from the pruned EVA trunk, Q-Former from the config, OPT
    from the built LM; its vocabulary grown by one when the image token needs a row)."""
    from transformers import Blip2Config

    cfg = model.cfg
    trunk = model.encoders["clip"].visual.trunk
    block = trunk.blocks[0]
    q = cfg.qformer
    text = model.captioner.lm.config.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        text.pop(key, None)
    text["vocab_size"] = max(text["vocab_size"], image_token_index + 1)
    return Blip2Config(
        vision_config=dict(hidden_size=trunk.embed_dim, intermediate_size=block.mlp.fc1.out_features,
                           num_hidden_layers=len(trunk.blocks), num_attention_heads=block.attn.num_heads,
                           image_size=trunk.patch_embed.img_size[0], patch_size=trunk.patch_embed.patch_size[0],
                           layer_norm_eps=block.norm1.eps, hidden_act="gelu", qkv_bias=True),
        qformer_config=dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                            intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_freq,
                            encoder_hidden_size=model.encoders["clip"].width),
        text_config=text, num_query_tokens=q.num_query_tokens, image_token_index=image_token_index)


def hf_state_dict(model) -> dict:
    """This model's tensors under ``Blip2ForConditionalGeneration``'s names (inverse of
    ``blip2_key_map`` and ``eva_vision_key_map``): what BLIP-2 has; the Q-Former's text side and stage-1
    heads, which its captioner never runs, are left out."""
    from msmedcap.models.loading import _TEXT_FFN, BLIP2_PREFIXES

    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if key.startswith(TRUNK):
            out.update(_vision_tensor(key[len(TRUNK):], value, model))
            continue
        for theirs, ours in BLIP2_PREFIXES:
            if key.startswith(ours) and not _TEXT_FFN.match(key):
                out[theirs + key[len(ours):]] = value
                break
    return out


def _vision_tensor(name: str, value: torch.Tensor, model) -> dict:
    emb = "vision_model.embeddings."
    direct = {"cls_token": emb + "class_embedding", "pos_embed": emb + "position_embedding",
              "patch_embed.proj.weight": emb + "patch_embedding.weight",
              "patch_embed.proj.bias": emb + "patch_embedding.bias"}
    if name in direct:
        return {direct[name]: value}
    if not name.startswith("blocks."):
        return {}
    i, rest = name[len("blocks."):].split(".", 1)
    layer = f"vision_model.encoder.layers.{i}."
    if rest == "attn.q_bias":  # EVA's q | (k: none) | v biases are BLIP-2's one qkv bias
        attn = model.encoders["clip"].visual.trunk.blocks[int(i)].attn
        return {layer + "self_attn.qkv.bias": torch.cat([value, torch.zeros_like(value), attn.v_bias.detach().cpu()])}
    if rest == "attn.v_bias":
        return {}
    parts = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.proj.": "self_attn.projection.",
             "attn.qkv.": "self_attn.qkv.", "mlp.": "mlp."}
    for ours, theirs in parts.items():
        if rest.startswith(ours):
            return {layer + theirs + rest[len(ours):]: value}
    return {layer + rest: value}  # unknown: load_state_dict below names it


def lm_tokenizer_with_image_token(cfg: Config):
    """A fresh copy of the LM tokenizer (the loader's is cached and shared) with ``<image>`` added."""
    from transformers import AddedToken, AutoTokenizer

    from msmedcap.config import resolve_asset

    tok = AutoTokenizer.from_pretrained(resolve_asset(cfg.model.lm.tokenizer), use_fast=True)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tok


def image_processor(model):
    """open_clip's eval transform (bicubic resize of the shorter side, centre crop, CLIP mean/std) as
    transformers' PIL-backed CLIP image processor: the resize msmedcap.data.transforms.ClipTransform does."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    t = model.encoders["clip"].transform
    return CLIPImageProcessorPil(size={"shortest_edge": t.size}, crop_size={"height": t.size, "width": t.size},
                                 resample=3, image_mean=list(t.mean), image_std=list(t.std), do_convert_rgb=True)


def generation_config(model, cfg: Config, image_token_index: int, grown: bool):
    """The run's generation settings (``cfg.eval``), captions ending at ``"\\n"`` as here; the image
    token is never generated when its row is an added one (its logit would be 0)."""
    from transformers import GenerationConfig

    tok, e = model.captioner.tokenizer, cfg.eval
    return GenerationConfig(num_beams=e.num_beams, min_new_tokens=e.min_len, max_new_tokens=e.max_len,
                            repetition_penalty=e.repetition_penalty, length_penalty=e.length_penalty, do_sample=False,
                            eos_token_id=model.captioner.eos_token_id, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, suppress_tokens=[image_token_index] if grown else None)


def build_hf(model, cfg: Config):
    """-> (``Blip2ForConditionalGeneration`` holding this model's weights in fp32, its ``Blip2Processor``)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    check_expressible(cfg)
    check_tower(model)
    tok = lm_tokenizer_with_image_token(cfg)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    hf_cfg = hf_config(model, image_id)
    vocab = model.captioner.lm.config.vocab_size
    grown = hf_cfg.text_config.vocab_size > vocab
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = Blip2ForConditionalGeneration(hf_cfg).float().eval()
    state = {k: v.float() for k, v in hf_state_dict(model).items()}  # exact: every dtype here widens to fp32
    embed = "language_model.model.decoder.embed_tokens.weight"
    if grown:  # the image token's row: its embedding is always replaced by a query, its logit suppressed
        state[embed] = torch.cat([state[embed], state[embed].new_zeros(hf_cfg.text_config.vocab_size - vocab,
                                                                       state[embed].shape[1])])
    tied = hf.language_model.config.tie_word_embeddings
    if tied:
        state.pop("language_model.lm_head.weight", None)
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "language_model.lm_head.weight")]
    if missing or result.unexpected_keys:
        from msmedcap.models.encoders import weights_mismatch

        raise weights_mismatch("export --hf", "this model", "Blip2ForConditionalGeneration", missing,
                               result.unexpected_keys)
    if tied:
        hf.tie_weights()
    hf.generation_config = generation_config(model, cfg, image_id, grown)
    processor = Blip2Processor(image_processor(model), tok, num_query_tokens=cfg.model.qformer.num_query_tokens)
    return hf, processor


@torch.no_grad()
def check_logits(model, hf, seed: int = 0) -> float:
    """The transformers model against this one on two random images, the prompt and a few tokens after
    it: the LM's logits predicting those tokens must agree (:func:`logits_tolerance`); returns the
    largest difference."""
    enc = model.encoders["clip"]
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, enc.transform.size, enc.transform.size, generator=g)
    prompt = model.captioner.prompt_ids.cpu()
    text = prompt[1:].expand(2, -1)  # any real tokens after the prompt will do
    ours = model.captioner.logits(model.query_outputs(image_features={"clip": enc(pixels.to(enc.dtype))}),
                                  text, torch.ones_like(text)).float()
    q = hf.config.num_query_tokens
    ids = torch.cat([torch.full((2, q), hf.config.image_token_index), prompt.expand(2, -1), text], dim=1)
    theirs = hf(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    theirs = theirs[:, q + len(prompt) - 1:-1, : ours.shape[-1]]  # predicting ``text``, in the LM's own vocabulary
    diff, tol = float((ours - theirs).abs().max()), logits_tolerance(model, ours)
    if not diff <= tol:
        raise ConfigError(f"export --hf: the transformers model computes other logits than this one (max |diff| "
                          f"{diff:.3g} > {tol:.3g}): its layout cannot hold this model. Export it with --bundle")
    return diff


def logits_tolerance(model, logits: torch.Tensor) -> float:
    """fp32 throughout: rounding only (:data:`LOGITS_ATOL`); a 16-bit frozen part here against the fp32
    export: 2 % of the logits' range (a layout that does not fit is off by far more)."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return LOGITS_ATOL
    return 0.02 * float(logits.max() - logits.min())


def write_hf_blip2(model, cfg: Config, out_dir: Path) -> dict:
    """Write the transformers directory into ``out_dir`` (which exists and is empty); -> facts for the card."""
    hf, processor = build_hf(model, cfg)
    diff = check_logits(model, hf)
    hf.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    log.info("transformers BLIP-2 written to %s (logits within %.2g of msmedcap's)", out_dir, diff)
    return {"format": "transformers", "logits_max_diff": diff, "image_token_index": hf.config.image_token_index}
