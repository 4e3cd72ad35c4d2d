"""The batch format: the contract between msmedcap.data (producer) and msmedcap.models (consumer).

A batch is a plain dict. Tensors are on CPU when the loader yields them; the trainer moves them.

    key                  list[str]          webdataset ``__key__`` of each sample
    source               list[str]          source dataset (json ``source``), e.g. "roco", "demo-general"
    domain               LongTensor [B]     DOMAINS index: 0 = general, 1 = medical
    caption              list[str]          raw caption (the reference at evaluation)
    clip_image           ByteTensor [B,Hc,Wc,3] uint8 RGB, channels last: CLIP's resize + center crop of the
                                            original image (Hc = Wc = model.clip.image_size)
    clip_image_size      LongTensor [B,2]   (h, w) of each image in clip_image (always Hc, Wc)
    sam_image            ByteTensor [B,Hs,Ws,3] uint8 RGB: SAM's longest-side resize of the original image, each
                                            top-left, zeros up to the batch's largest Hs, Ws (<= image_size)
    sam_image_size       LongTensor [B,2]   (h, w) of each resized image in sam_image
    jpeg_bytes           list[ByteTensor|None]  only with data.gpu_decode: encoded JPEGs whose rows in the
                                            image tensors are zero placeholders until the model's input
                                            path decodes them on its device (msmedcap.data.gpu_decode)
    text_input_ids       LongTensor [B,T]   Q-Former tokenizer ([CLS] caption [SEP]), cut at max_text_len, right-
                                            padded to the batch's longest (T <= max_text_len; stage 1 pads
                                            further to the longest over all ranks, a multiple of 8)
    text_attention_mask  LongTensor [B,T]
    lm_input_ids         LongTensor [B,L]   LM tokenizer of caption + "\\n" (no special tokens), right-padded
                                            to the batch's longest (L <= max_caption_len); a longer caption is
                                            cut before the "\\n",
                                            which is always kept (msmedcap.tokenization.encode_lm_captions)
    lm_attention_mask    LongTensor [B,L]
    image_sha256         list[str]          sha256 hex of each encoded image (only with model.feature_cache)
    truncated            dict[str,int]      captions of this batch cut to fit: "qformer_text" (max_text_len),
                                            "lm_caption" (max_caption_len)
    skipped              dict[str,int]      samples skipped per reason since the same loader worker's
                                            previous batch ("bad_image", "missing_caption", "bad_json",
                                            "no_domain", "too_large", "bad_tar", "bad_sample"): sum them for metrics

``clip_image``/``sam_image`` are present only for the branches the model variant uses: one
``<branch>_image`` and ``<branch>_image_size`` per registered encoder (``EncoderSpec.image_key`` /
``size_key`` in msmedcap.registry; its transform makes the pixels). Each comes
from the original decoded image with its own encoder's resize. They cross the DataLoader's worker
boundary as uint8 (a 1024-px SAM image is 2-3 MB instead of 12.6 MB of float32 with its padding);
each encoder's normalisation and SAM's zero padding to image_size run on the device, in the frozen
encoder's dtype, in one place: ``msmedcap.models.encoders.FrozenEncoder.prepare`` (``encoder_input``).
A floating ``*_image`` tensor ``[B,3,H,W]`` is taken as already normalised (synthetic benchmark batches).
"""

DOMAINS = ("general", "medical")
DOMAIN_INDEX = {d: i for i, d in enumerate(DOMAINS)}
CAPTION_EOS = "\n"  # BLIP-2 OPT ends captions with a newline

# CLIP (OpenAI) and SAM pixel statistics; the encoders' own defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
