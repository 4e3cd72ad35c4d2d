"""Tiny random LMs of each family the captioner supports, at one width (64 wide, 2 layers, 2 heads, FFN 128),
saved as ``save_pretrained`` saves them, speaking the demo's LM tokenizer. (No tests here.)

The configs follow transformers' own classes (OPTConfig, GPT2Config, LlamaConfig, BioGptConfig, T5Config of the
installed release); the Llama uses grouped-query attention (1 KV head) as Llama-3 and Mistral do.
"""
from __future__ import annotations

import torch

DEMO_LM_TOKENIZER = "pkg://assets/tokenizers/lm"
FAMILIES = ("opt", "gpt2", "llama", "biogpt", "t5")


def tiny_lm_config(family: str, tok):
    import transformers as tf

    special = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
               "eos_token_id": tok.eos_token_id}
    return {
        "opt": lambda: tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
                                    max_position_embeddings=128, word_embed_proj_dim=64, **special),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_inner=128, n_positions=128, **special),
        "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                        **special),
        "biogpt": lambda: tf.BioGptConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=128, **special),
        "t5": lambda: tf.T5Config(d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                                  decoder_start_token_id=tok.pad_token_id, **special),
    }[family]()


def save_tiny_lm(family: str, out, tok, seed: int = 0, std: float = None):
    """``out`` holding a random ``family`` LM (config.json + model.safetensors). ``std``: every tensor redrawn
    from N(0, std), so that (unlike at the families' 0.02-scale init, whose next-token distribution is nearly
    flat) what the LM generates depends on its input, and captions differ between images."""
    import transformers as tf

    config = tiny_lm_config(family, tok)
    auto = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
    torch.manual_seed(seed)
    lm = auto.from_config(config)
    if std is not None:
        with torch.no_grad():
            for p in lm.parameters():
                p.normal_(0.0, std)
    lm.save_pretrained(out)
    return out
