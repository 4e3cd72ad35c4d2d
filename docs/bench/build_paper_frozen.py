"""Build the paper preset's model (random frozen parts, OPT-2.7B dims, demo tokenizers) with frozen_dtype=bf16;
print peak RSS, wall time and the frozen parts' dtypes. Run with PYTHONPATH at the tree to measure."""
import json, resource, sys, time

import torch

OPT_2_7B = "{hidden_size: 2560, num_hidden_layers: 32, num_attention_heads: 32, ffn_dim: 10240, max_position_embeddings: 2048, word_embed_proj_dim: 2560, vocab_size: 50272}"
OV = ["model.allow_random_weights=true", "model.clip.pretrained=null", "model.qformer.init_from=null",
      "model.lm.name_or_path=null", f"model.lm.config={OPT_2_7B}", "model.frozen_dtype=bf16",
      "model.qformer.tokenizer=pkg://assets/tokenizers/qformer", "model.lm.tokenizer=pkg://assets/tokenizers/lm"]

from msmedcap.config import load_config
from msmedcap.models import build_model

torch.set_num_threads(2)
cfg = load_config("paper", OV, check_files=False)
t = time.perf_counter()
model = build_model(cfg.model)
wall = time.perf_counter() - t
dtypes = {part: sorted({str(p.dtype) for p in mod.parameters()})
          for part, mod in [("clip", model.encoders["clip"]), ("sam", model.encoders["sam"]), ("lm", model.captioner.lm)]}
print(json.dumps({"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "build_s": round(wall, 1),
                  "dtypes": dtypes, "frozen_params": sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)}))
