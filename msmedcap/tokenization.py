"""Tokenizers for the Q-Former (BERT WordPiece) and the language model (OPT byte-level BPE).

Real runs load ``bert-base-uncased`` and OPT's tokenizer by name or path; the demo's small ones of
the same kinds are shipped under ``msmedcap/assets/tokenizers`` (msmedcap.demo.tokenizers trains them).
"""
from __future__ import annotations

from functools import lru_cache

from msmedcap.batch import CAPTION_EOS
from msmedcap.config import resolve_asset

DEC_TOKEN = "[DEC]"  # BLIP-2's ITG bos token, added to the BERT vocabulary


@lru_cache(maxsize=8)
def load_qformer_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_asset(name_or_path), truncation_side="right")
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


@lru_cache(maxsize=8)
def load_lm_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_asset(name_or_path), use_fast=True)
    tok.padding_side = "right"
    return tok


def encode_lm_captions(tok, captions: list, max_len: int) -> dict:
    """LM targets: each caption's tokens + the end token (``CAPTION_EOS``), right-padded to the longest
    of the batch (at most ``max_len``: stage 2's LM runs on these positions only). A caption longer than
    ``max_len`` is cut *before* the end token, which is always kept, so the model learns to stop on long
    captions too. -> {"input_ids", "attention_mask" (LongTensor [B, L], L = the longest row <= max_len),
    "truncated" (BoolTensor [B]: the caption lost tokens)}."""
    import torch

    eos = list(tok(CAPTION_EOS, add_special_tokens=False)["input_ids"])
    if not 0 < len(eos) < max_len:
        raise ValueError(f"model.lm.max_caption_len={max_len} leaves no room for a caption before the end token {eos}")
    room = max_len - len(eos)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(captions), max_len), pad, dtype=torch.long)
    mask = torch.zeros((len(captions), max_len), dtype=torch.long)
    truncated = torch.zeros(len(captions), dtype=torch.bool)
    # the caption with its end token, tokenized together (as generation sees it), then cut before the end
    for i, full in enumerate(tok([c + CAPTION_EOS for c in captions], add_special_tokens=False)["input_ids"]):
        body = full[: -len(eos)] if full[-len(eos):] == eos else full
        truncated[i] = len(body) > room
        row = body[:room] + eos
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    longest = int(mask.sum(1).max()) if len(captions) else 0
    return {"input_ids": ids[:, :longest], "attention_mask": mask[:, :longest], "truncated": truncated}


def encode_qformer_text(tok, captions: list, max_len: int) -> dict:
    """Q-Former text ([CLS] caption [SEP]) cut at ``max_len`` (keeping [SEP]), right-padded to the longest
    of the batch (stage 1 pads further to the longest over all ranks: ``models.stage1.text_length``).
    -> {"input_ids", "attention_mask" (LongTensor [B, T], T <= max_len), "truncated" (int: captions cut)}."""
    q = tok(list(captions), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    lengths = [len(ids) for ids in tok(list(captions), truncation=False, verbose=False)["input_ids"]]
    return {"input_ids": q["input_ids"], "attention_mask": q["attention_mask"],
            "truncated": sum(n > max_len for n in lengths)}
