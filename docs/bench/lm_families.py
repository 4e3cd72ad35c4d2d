"""Stage-2 step time per LM family at equal width (docs/models.md): a random LM of each family saved with
save_pretrained at WIDTH x LAYERS (heads of 32, FFN 4 x WIDTH), then `msmedcap bench --parts step` on the demo
preset with it as model.lm.name_or_path (the trainer's DeepSpeed engine, one rank). Prints a Markdown table.

    PYTHONPATH=. python docs/bench/lm_families.py WIDTH LAYERS [BATCH]
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf

from msmedcap.tokenization import load_lm_tokenizer

width, layers = int(sys.argv[1]), int(sys.argv[2])
batch = sys.argv[3] if len(sys.argv) > 3 else "16"
tok = load_lm_tokenizer("pkg://assets/tokenizers/lm")
special = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
heads, ffn = width // 32, 4 * width
configs = {
    "opt": tf.OPTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                        word_embed_proj_dim=width, max_position_embeddings=256, **special),
    "gpt2": tf.GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=256, **special),
    "llama": tf.LlamaConfig(hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                            max_position_embeddings=256, **special),
    "biogpt": tf.BioGptConfig(hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                              num_attention_heads=heads, max_position_embeddings=256, **special),
    # T5 splits the layers: the prefix through LAYERS encoder blocks, the caption through LAYERS decoder blocks
    "t5": tf.T5Config(d_model=width, d_kv=32, d_ff=ffn, num_layers=layers, num_heads=heads,
                      decoder_start_token_id=tok.pad_token_id, **special),
}
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for family, config in configs.items():
        auto = tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder else tf.AutoModelForCausalLM
        torch.manual_seed(0)
        lm = auto.from_config(config)
        lm.save_pretrained(Path(tmp) / family)
        out = Path(tmp) / f"{family}.json"
        subprocess.run([sys.executable, "-m", "msmedcap.cli", "bench", "--parts", "step", "--variants", "msmedcap",
                        "--stages", "2", "--threads", "1", "--iters", "5", "--warmup", "2", "--batch", batch,
                        "--out", str(out), f"model.lm.name_or_path={Path(tmp) / family}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        step = json.loads(out.read_text())["step"][0]
        rows.append((family, sum(p.numel() for p in lm.parameters()) / 1e6, step["step_s"] * 1e3,
                     step["split_s"]["opt_fwd_bwd"] * 1e3, step["flops_per_sample"] / 1e6))
print(f"width {width}, {layers} layers, micro batch {batch}, demo preset (msmedcap variant), 1 thread\n")
print("| family | LM params (M) | step ms | LM fwd+bwd ms | MFLOP/sample (whole step) |")
print("|---|---|---|---|---|")
for family, params, step_ms, lm_ms, mflop in rows:
    print(f"| {family} | {params:.2f} | {step_ms:.1f} | {lm_ms:.1f} | {mflop:.0f} |")
