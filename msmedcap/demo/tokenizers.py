"""The demo's tokenizers, trained on its captions: a BERT-style WordPiece for the Q-Former and an
OPT-style byte-level BPE for the LM (shipped in msmedcap/assets/tokenizers; rebuilt by
``msmedcap demo shards --tokenizers DIR``)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


def train_demo_tokenizers(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000) -> tuple:
    """Train a BERT-style WordPiece and an OPT-style byte-level BPE tokenizer on ``texts`` and save
    them as HF tokenizer directories ``out_dir/qformer`` and ``out_dir/lm``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    texts = list(texts)
    out_dir = Path(out_dir)

    # Q-Former: lower-cased WordPiece with BERT's special tokens and [CLS] x [SEP] template.
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    bert = BertTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)
    bert.save_pretrained(out_dir / "qformer")

    # LM: byte-level BPE with OPT's special tokens (</s> is bos and eos, as in OPT).
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = bpe.token_to_id("</s>")
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bos)])
    opt = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    opt.save_pretrained(out_dir / "lm")
    return out_dir / "qformer", out_dir / "lm"
