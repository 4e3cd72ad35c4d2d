"""An HF-format BLIP-2 checkpoint imported into the blip2 variant computes what transformers computes."""
import pytest
import torch
from helpers.model_kit import demo_config, make_batch, one_thread, tiny_eva_clip_json
from transformers import Blip2Config, Blip2ForConditionalGeneration

from msmedcap.config import ConfigError
from msmedcap.models import build_model
from msmedcap.tokenization import load_lm_tokenizer

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def hf_dir(tokenizers, tmp_path_factory):
    """A tiny random Blip2ForConditionalGeneration shaped like the demo preset, saved as HF saves it."""
    cfg = demo_config(tokenizers)
    q, lm = cfg.model.qformer, cfg.model.lm
    vocab = len(load_lm_tokenizer(lm.tokenizer))
    width = 64  # the demo's tiny-vit tower width: the Q-Former cross-attends 64-wide tokens
    hf_cfg = Blip2Config(
        vision_config=dict(hidden_size=width, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                            intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_freq,
                            encoder_hidden_size=width),
        text_config=dict(model_type="opt", vocab_size=vocab + 1, **lm.config),
        num_query_tokens=q.num_query_tokens, image_token_index=vocab)  # an id outside the text vocabulary
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits these; random values make the comparison meaningful
        hf.query_tokens.normal_(std=0.5)
        hf.vision_model.post_layernorm.weight.normal_(1.0, 0.2)
        hf.vision_model.post_layernorm.bias.normal_(std=0.2)
    out = tmp_path_factory.mktemp("blip2")
    hf.save_pretrained(out)
    return out


def blip2_config(tokenizers, hf_dir, *extra):
    cfg = demo_config(tokenizers, "model.variant=blip2", "model.frozen_dtype=fp32", "model.lm.num_soft_prompts=0",
                      f"model.blip2_checkpoint={hf_dir}", *extra)
    cfg.model.lm.config = {}  # OPT's architecture from the checkpoint's text_config
    return cfg


def test_imported_blip2_gives_transformers_logits_and_greedy_caption(tokenizers, hf_dir):
    cfg = blip2_config(tokenizers, hf_dir)
    model = build_model(cfg.model).eval()
    hf = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    batch = make_batch(cfg, domains=[0] * 8)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        vision = hf.vision_model(pixels, output_hidden_states=True)
        tokens = vision.hidden_states[-1]  # the tower's tokens before BLIP-2's post_layernorm (= our ln_vision)
        assert torch.allclose(hf.vision_model.post_layernorm(tokens), vision.last_hidden_state, atol=1e-6)
        ours = model.caption_logits({k: v[:4] for k, v in batch.items()}, image_features={"clip": tokens})

        prompt = model.captioner.prompt_ids
        image_ids = torch.full((4, cfg.model.qformer.num_query_tokens), hf.config.image_token_index)
        caption, caption_mask = batch["lm_input_ids"][:4], batch["lm_attention_mask"][:4]
        ids = torch.cat([image_ids, prompt.expand(4, -1), caption], dim=1)
        mask = torch.cat([torch.ones_like(image_ids), torch.ones(4, len(prompt), dtype=torch.long), caption_mask], 1)
        theirs = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        theirs = theirs[:, image_ids.shape[1] + len(prompt) - 1: -1]  # the positions predicting caption tokens
        keep = caption_mask.bool()
        assert ours.shape == theirs.shape
        assert ours[keep].abs().max() > 0.01  # not trivially equal
        torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)

        ours_text = model.generate({}, num_beams=1, min_len=1, max_len=12, image_features={"clip": tokens})
        start = torch.cat([image_ids, prompt.expand(4, -1)], dim=1)
        out = hf.generate(pixel_values=pixels, input_ids=start, max_new_tokens=12, min_new_tokens=1, num_beams=1,
                          do_sample=False, eos_token_id=model.captioner.eos_token_id,
                          pad_token_id=model.captioner.tokenizer.pad_token_id)
        tok = model.captioner.tokenizer
        theirs_text = [t.strip() for t in tok.batch_decode(out[:, start.shape[1]:], skip_special_tokens=True)]
    assert ours_text == theirs_text
    assert any(ours_text)


def test_stage_1_imports_blip2_without_building_the_lm(tokenizers, hf_dir):
    """Stage 1 builds no LM (``with_lm=False``): the checkpoint's Q-Former and projection still load, and
    every trainable comes out as in the whole model (same seed)."""
    cfg = blip2_config(tokenizers, hf_dir)
    torch.manual_seed(0)
    stage1 = build_model(cfg.model, with_lm=False)
    torch.manual_seed(0)
    whole = build_model(cfg.model)
    assert stage1.captioner.lm is None
    for name, p in stage1.trainable_named_parameters():
        assert torch.equal(p, dict(whole.trainable_named_parameters())[name]), name


def test_blip2_import_rejects_a_config_that_does_not_fit(tokenizers, hf_dir):
    with pytest.raises(ConfigError, match="qformer.num_layers"):
        build_model(blip2_config(tokenizers, hf_dir, "model.qformer.num_layers=4").model)
    with pytest.raises(ConfigError, match="CLIP branch"):
        build_model(blip2_config(tokenizers, hf_dir, "model.variant=sam-blip2").model)


def test_blip2_vision_tower_loads_into_open_clip_eva(tokenizers, tmp_path):
    clip_json = tiny_eva_clip_json(tmp_path)  # an open_clip config on a timm EVA, as EVA01-g-14's is
    cfg = demo_config(tokenizers)
    q = cfg.model.qformer
    hf_cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14),  # BLIP-2 drops EVA's last block: 2 of our 3
        qformer_config=dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                            intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_freq,
                            encoder_hidden_size=32),
        text_config=dict(model_type="opt", vocab_size=len(load_lm_tokenizer(cfg.model.lm.tokenizer)),
                         **cfg.model.lm.config),
        num_query_tokens=q.num_query_tokens)
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # non-zero q/v biases (k stays 0, as EVA has none) and embeddings
        for layer in hf.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[:32].normal_()
            layer.self_attn.qkv.bias[64:].normal_()
        hf.vision_model.embeddings.class_embedding.normal_()
        hf.vision_model.embeddings.position_embedding.normal_()
    hf.save_pretrained(tmp_path / "blip2")

    cfg = demo_config(tokenizers, "model.variant=blip2", "model.frozen_dtype=fp32", f"model.clip.name={clip_json}",
                      "model.clip.pretrained=null", "model.clip.image_size=28", f"model.blip2_checkpoint={tmp_path / 'blip2'}")
    model = build_model(cfg.model).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        theirs = hf.vision_model(pixels, output_hidden_states=True).hidden_states[-1]
        ours = model.encoders["clip"](pixels)
    assert ours.shape == theirs.shape == (2, 5, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
