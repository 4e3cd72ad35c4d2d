"""HF BLIP-2 checkpoints whose language model is T5 (the ``Salesforce/blip2-flan-t5-xl`` layout: prefix into the
encoder, caption from the decoder) or a Llama-type causal LM, imported with ``model.blip2_checkpoint``, compute
what transformers' ``Blip2ForConditionalGeneration`` computes: logits on teacher-forced captions and greedy
captions (atol 1e-4, as tests/unit/test_model_blip2_import.py does for OPT). The checkpoints are tiny random ones of
the installed transformers release's classes, saved with ``save_pretrained``."""
import pytest
import torch
from helpers.model_kit import CAPTIONS, demo_config, one_thread, random_hf_blip2
from transformers import Blip2ForConditionalGeneration

from msmedcap.config import ConfigError
from msmedcap.models import build_model
from msmedcap.tokenization import encode_lm_captions, load_lm_tokenizer

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def text_config(family: str, tok) -> dict:
    special = dict(vocab_size=len(tok) + 1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id)  # + 1: the image token's id, outside the text vocabulary
    if family == "t5":  # Flan-T5's architecture (gated-GELU FFN, untied head), at toy size
        return dict(model_type="t5", d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    decoder_start_token_id=tok.pad_token_id, **special)
    return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128, **special)


def save_blip2(family: str, tokenizers, out):
    cfg = demo_config(tokenizers)
    tok = load_lm_tokenizer(cfg.model.lm.tokenizer)
    hf = random_hf_blip2(cfg, text_config(family, tok), image_token_index=len(tok))
    with torch.no_grad():
        for p in [*hf.language_model.parameters(), hf.language_projection.weight]:  # captions depend on the image
            p.normal_(std=0.3)
        if family == "t5":  # Flan-T5's own output head, not the input embeddings (transformers then unties them)
            hf.language_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.language_model.lm_head.weight))
        hf.vision_model.embeddings.patch_embedding.weight.normal_(std=0.5)  # tokens that differ between images
        for name, p in hf.qformer.named_parameters():  # as model.qformer.cross_attention_init: queries read them
            if "crossattention" in name and p.dim() == 2:
                p.normal_(std=0.2)
    hf.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_imported_blip2_gives_transformers_logits_and_greedy_captions(family, tokenizers, tmp_path):
    hf_dir = save_blip2(family, tokenizers, tmp_path / "blip2")
    cfg = demo_config(tokenizers, "model.variant=blip2", "model.frozen_dtype=fp32", "model.lm.num_soft_prompts=0",
                      f"model.blip2_checkpoint={hf_dir}")
    cfg.model.lm.config = {}  # the LM's architecture from the checkpoint's text_config
    model = build_model(cfg.model).eval()
    assert type(model.captioner.lm).__name__ == {"t5": "T5ForConditionalGeneration", "llama": "LlamaForCausalLM"}[family]
    hf = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    if family == "t5":  # both sides hold the checkpoint's own head
        lm = model.captioner.lm
        assert lm.lm_head.weight is not lm.shared.weight and hf.language_model.lm_head.weight is not hf.language_model.shared.weight
        assert torch.equal(lm.lm_head.weight, hf.language_model.lm_head.weight)
    tok = model.captioner.tokenizer
    assert model.captioner.eos_token_id == tok.eos_token_id  # not OPT: the caption ends with the LM's EOS
    lm = encode_lm_captions(tok, CAPTIONS[:4], cfg.model.lm.max_caption_len, tok.eos_token)
    caption, caption_mask = lm["input_ids"], lm["attention_mask"]
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = hf.vision_model(pixels, output_hidden_states=True).hidden_states[-1]  # before post_layernorm
        batch = {"lm_input_ids": caption, "lm_attention_mask": caption_mask}
        ours = model.caption_logits(batch, image_features={"clip": tokens})

        prompt = model.captioner.prompt_ids.expand(4, -1)
        image_ids = torch.full((4, cfg.model.qformer.num_query_tokens), hf.config.image_token_index)
        start = torch.cat([image_ids, prompt], dim=1)
        if family == "t5":  # prefix -> encoder; the decoder reads [start | caption[:-1]]
            decoder_ids = hf.language_model.prepare_decoder_input_ids_from_labels(labels=caption)
            theirs = hf(pixel_values=pixels, input_ids=start, attention_mask=torch.ones_like(start),
                        decoder_input_ids=decoder_ids).logits
        else:
            ids = torch.cat([start, caption], dim=1)
            mask = torch.cat([torch.ones_like(start), caption_mask], dim=1)
            theirs = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
            theirs = theirs[:, start.shape[1] - 1: -1]  # the positions predicting caption tokens
        keep = caption_mask.bool()
        assert ours.shape == theirs.shape
        assert ours[keep].abs().max() > 0.01  # not trivially equal
        torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)

        ours_text = model.generate({}, num_beams=1, min_len=1, max_len=12, image_features={"clip": tokens})
        out = hf.generate(pixel_values=pixels, input_ids=start, max_new_tokens=12, min_new_tokens=1, num_beams=1,
                          do_sample=False, eos_token_id=model.captioner.eos_token_id, pad_token_id=tok.pad_token_id)
        new = out if family == "t5" else out[:, start.shape[1]:]  # a decoder-only LM returns the prompt too
        theirs_text = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    assert ours_text == theirs_text
    assert len(set(ours_text)) > 1, ours_text


def test_a_blip2_checkpoint_whose_lm_lacks_a_tensor_is_refused_naming_it(tokenizers, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = save_blip2("t5", tokenizers, tmp_path / "blip2")
    state = load_file(hf_dir / "model.safetensors")
    del state["language_model.decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = demo_config(tokenizers, "model.variant=blip2", f"model.blip2_checkpoint={hf_dir}")
    cfg.model.lm.config = {}
    with pytest.raises(ConfigError, match=r"model.blip2_checkpoint: .*missing \(captioner.lm.decoder.block.1.layer.2"):
        build_model(cfg.model)
