"""Long captions (issue 13, item 4): the LM side keeps its end token when it truncates, both sides
count the captions they cut, the counts reach the trainer's metrics, and the paper preset is sized
for real medical captions (ROCO: median 16 words, p90 37, p99 81, max 187)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers.data import tiny_config
from msmedcap.batch import CAPTION_EOS
from msmedcap.config import ConfigError, load_config
from msmedcap.data.loader import make_eval_loader
from msmedcap.data.shards import write_shards
from msmedcap.tokenization import encode_lm_captions, load_lm_tokenizer, load_qformer_tokenizer

LONG = ("axial contrast enhanced ct of the abdomen showing two small lesions in the left kidney with irregular "
        "margins and a large lesion in the right kidney with smooth margins and no other focal lesion")


def test_lm_truncation_keeps_the_end_token():
    cfg = tiny_config()
    tok = load_lm_tokenizer(cfg.model.lm.tokenizer)
    eos = tok(CAPTION_EOS, add_special_tokens=False).input_ids
    short = "axial ct of the abdomen."
    out = encode_lm_captions(tok, [short, LONG], max_len=12)
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 12)
    plain = tok(short + CAPTION_EOS, add_special_tokens=False).input_ids
    n = int(out["attention_mask"][0].sum())
    assert out["input_ids"][0, :n].tolist() == plain and not out["truncated"][0]  # short: as before
    assert out["attention_mask"][1].tolist() == [1] * 12 and out["truncated"][1]
    assert out["input_ids"][1, -len(eos):].tolist() == eos  # long: cut before the end token, which stays
    body = tok(LONG, add_special_tokens=False).input_ids
    assert out["input_ids"][1, : 12 - len(eos)].tolist() == body[: 12 - len(eos)]
    # exactly max_len with its end token: not truncated
    exact = encode_lm_captions(tok, [LONG], max_len=len(tok(LONG + CAPTION_EOS, add_special_tokens=False).input_ids))
    assert not exact["truncated"][0] and exact["attention_mask"].all()
    with pytest.raises(ValueError, match="no room"):
        encode_lm_captions(tok, [short], max_len=len(eos))


def test_loader_counts_truncated_captions_per_side(tmp_path):
    captions = ["axial ct of the abdomen.", LONG, LONG + " in the left kidney", "two red circles."]
    from helpers.data import sample

    samples = [dict(sample(f"s-{i}", i), txt=c) for i, c in enumerate(captions)]
    write_shards(samples, tmp_path, "t", shard_size=10)
    cfg = tiny_config(model__qformer__max_text_len=12, model__lm__max_caption_len=10)
    (b,) = make_eval_loader(cfg, [str(tmp_path / "t-000.tar")], 0, 1, batch_size=4)
    assert b["truncated"] == {"qformer_text": 2, "lm_caption": 2}
    qtok = load_qformer_tokenizer(cfg.model.qformer.tokenizer)
    assert b["text_input_ids"][1, -1].item() == qtok.sep_token_id  # the Q-Former side keeps [SEP]
    eos = load_lm_tokenizer(cfg.model.lm.tokenizer)(CAPTION_EOS, add_special_tokens=False).input_ids
    assert b["lm_input_ids"][1, -1].item() == eos[-1] and b["lm_input_ids"][2, -1].item() == eos[-1]


def test_trainer_window_reports_truncated_captions():
    """The metrics record's ``truncated_captions`` sums the batches' counts over the log window and ranks."""
    from msmedcap.train.trainer import Window

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    w = Window()
    mask = torch.ones(4, 5, dtype=torch.long)
    for n in (1, 2):
        w.add({"loss": torch.tensor(1.0)}, {"key": ["a"] * 4, "text_attention_mask": mask, "skipped": {},
                                            "truncated": {"qformer_text": n, "lm_caption": n - 1}}, stage=1)
    stats = w.reduce(dist)
    assert stats["truncated"] == {"qformer_text": 3, "lm_caption": 1} and stats["samples"] == 8


def test_paper_preset_lengths_fit_real_medical_captions():
    cfg = load_config("paper", ["model.sam.checkpoint=sam_vit_b_01ec64.pth"], check_files=False)  # the preset names none
    assert cfg.model.qformer.max_text_len == 320  # the reference code's Q-Former text length
    assert cfg.model.lm.max_caption_len == 128 and cfg.eval.max_len == 64
    with pytest.raises(ConfigError, match="model.qformer.max_text_len"):
        load_config("paper", ["model.qformer.max_text_len=600"], check_files=False)  # over BERT's 512 positions


def test_caption_set_from_published_lengths():
    from msmedcap.analysis.caption_lengths import ROCO_WORD_QUANTILES, quantile, report, synthetic_captions

    captions = synthetic_captions(["axial ct of the abdomen showing a lesion", "chest x-ray"], 4000)
    words = [len(c.split()) for c in captions]
    for share, n in ROCO_WORD_QUANTILES[1:-1]:  # p50 16, p90 37, p99 81 words
        assert abs(quantile(words, share) - n) <= max(1, 0.06 * n), (share, quantile(words, share))
    assert max(words) <= 187
    cfg = tiny_config()
    r = report(captions, load_qformer_tokenizer(cfg.model.qformer.tokenizer), load_lm_tokenizer(cfg.model.lm.tokenizer),
               qformer_limits=(32, 320), lm_limits=(32, 128))
    assert r["n"] == 4000 and r["qformer_truncated"][32] > 0.2 and r["lm_truncated"][32] > r["lm_truncated"][128]
