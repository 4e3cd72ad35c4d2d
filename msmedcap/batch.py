"""The batch format: the contract between msmedcap.data (producer) and msmedcap.models (consumer).

A batch is a plain dict. Tensors are on CPU when the loader yields them; the trainer moves them.

    key                  list[str]          webdataset ``__key__`` of each sample
    source               list[str]          source dataset (json ``source``), e.g. "roco", "demo-general"
    domain               LongTensor [B]     DOMAINS index: 0 = general, 1 = medical
    caption              list[str]          raw caption (the reference at evaluation)
    clip_image           FloatTensor [B,3,Hc,Wc]   CLIP-normalised, resized from the original image
    sam_image            FloatTensor [B,3,Hs,Ws]   SAM-normalised (longest side resized, zero-padded)
    text_input_ids       LongTensor [B,T]   Q-Former tokenizer ([CLS] caption [SEP]), padded to max_text_len
    text_attention_mask  LongTensor [B,T]
    lm_input_ids         LongTensor [B,L]   LM tokenizer of caption + "\\n" (no special tokens), right-padded
                                            to L = max_caption_len; a longer caption is cut before the "\\n",
                                            which is always kept (msmedcap.tokenization.encode_lm_captions)
    lm_attention_mask    LongTensor [B,L]
    image_sha256         list[str]          sha256 hex of each encoded image (only with model.feature_cache)
    truncated            dict[str,int]      captions of this batch cut to fit: "qformer_text" (max_text_len),
                                            "lm_caption" (max_caption_len)
    skipped              dict[str,int]      samples skipped per reason since the same loader worker's
                                            previous batch ("bad_image", "missing_caption", "bad_json",
                                            "no_domain", "too_large", "bad_tar", "bad_sample"): sum them for metrics

``clip_image``/``sam_image`` are present only for the branches the model variant uses. Each comes
from the original decoded image with its own encoder's resize and normalisation.
"""

DOMAINS = ("general", "medical")
DOMAIN_INDEX = {d: i for i, d in enumerate(DOMAINS)}
CAPTION_EOS = "\n"  # BLIP-2 OPT ends captions with a newline

# CLIP (OpenAI) and SAM pixel statistics; the encoders' own defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
