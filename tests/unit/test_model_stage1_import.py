"""Stage-1 warm starts (issue 13, item 3): LAVIS's ``blip2_pretrained.pth`` layout and transformers'
``Blip2ForImageTextRetrieval`` (the layout of Salesforce/blip2-itm-vit-g) into either branch; and the
per-branch ``ln_vision`` switch (item 6).

LAVIS's names and shapes are written out here from its public source (github.com/salesforce/LAVIS,
commit 506965b9, files lavis/models/blip2_models/{Qformer.py, blip2_qformer.py, blip2.py}); LAVIS itself
does not run on this transformers version, so its state dict is built by hand, module by module."""
import argparse

import pytest
import torch
from helpers.model_kit import CAPTIONS, demo_config, one_thread
from transformers import Blip2Config, Blip2ForImageTextRetrieval

from msmedcap.config import ConfigError
from msmedcap.models import build_model
from msmedcap.tokenization import load_qformer_tokenizer

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

WIDTH = {"clip": 64, "sam": 256}  # the demo's tiny-vit tower width; tiny SAM in the channels layout (16x16 positions)
H, LAYERS, INTER, QUERIES, EMBED, POSITIONS = 64, 2, 128, 16, 32, 512  # the demo preset's Q-Former
FREQ = 2  # LAVIS's cross_attention_freq: layer 1 has no cross-attention, as in blip2_pretrained.pth


@pytest.fixture(scope="module")
def vocab(tokenizers):
    return len(load_qformer_tokenizer(tokenizers[0]))  # WordPiece + [DEC], as LAVIS's bert-base-uncased + [DEC]


def config(tokenizers, *overrides):
    return demo_config(tokenizers, "model.frozen_dtype=fp32", f"model.qformer.cross_attention_freq={FREQ}",
                       "model.sam.token_layout=channels", "model.clip.token_mlp=0", "model.sam.token_mlp=0",
                       *overrides).model  # BLIP-2's layout: no token adapter unless a test sets one


# --------------------------------------------------------------------------- LAVIS
def lavis_state_dict(vocab: int, width: int, seed: int = 0) -> dict:
    """The state dict of LAVIS's ``Blip2Qformer`` (tiny dims), name by name from its source:

    - blip2_qformer.py ``Blip2Qformer.__init__``: ``ln_vision`` (blip2.py ``init_vision_encoder``:
      ``LayerNorm(visual_encoder.num_features)``), ``Qformer`` + ``query_tokens`` [1, Q, H]
      (``init_Qformer``), ``Qformer.resize_token_embeddings(len(tokenizer))`` (BERT + [DEC]),
      ``vision_proj`` / ``text_proj`` Linear(H, embed_dim), ``itm_head`` Linear(H, 2),
      ``temp = nn.Parameter(0.07 * torch.ones([]))`` (shape []).
    - Qformer.py ``BertLMHeadModel``: ``bert`` (``BertModel``, no pooler) + ``cls`` (``BertOnlyMLMHead``).
      ``BertEmbeddings``: ``word_embeddings``, ``position_embeddings``, ``LayerNorm``, the persistent
      ``position_ids`` buffer (no token types). ``BertLayer``: ``attention.{self.{query,key,value},
      output.{dense,LayerNorm}}``; ``crossattention`` (same, key/value ``Linear(encoder_width, H)``) where
      ``layer_num % cross_attention_freq == 0``; ``intermediate.dense``, ``output.{dense,LayerNorm}`` and
      the query copies ``intermediate_query``, ``output_query``. ``BertLMPredictionHead``:
      ``transform.{dense,LayerNorm}``, ``decoder`` (tied to the word embeddings) and ``bias``
      (``decoder.bias = self.bias``: both names in the state dict).
    Every value is random (and so unique), so where each lands can be checked by value."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def t(name, *shape):
        sd[name] = torch.randn(*shape, generator=g)

    def linear(name, n_out, n_in):
        t(f"{name}.weight", n_out, n_in)
        t(f"{name}.bias", n_out)

    def norm(name, n):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
        t(f"{name}.bias", n)

    norm("ln_vision", width)
    t("query_tokens", 1, QUERIES, H)
    q = "Qformer.bert."
    t(q + "embeddings.word_embeddings.weight", vocab, H)
    t(q + "embeddings.position_embeddings.weight", POSITIONS, H)
    norm(q + "embeddings.LayerNorm", H)
    sd[q + "embeddings.position_ids"] = torch.arange(POSITIONS).expand(1, -1).clone()
    for i in range(LAYERS):
        layer = f"{q}encoder.layer.{i}."
        for part, kv_in in [("attention", H)] + ([("crossattention", width)] if i % FREQ == 0 else []):
            linear(f"{layer}{part}.self.query", H, H)
            linear(f"{layer}{part}.self.key", H, kv_in)
            linear(f"{layer}{part}.self.value", H, kv_in)
            linear(f"{layer}{part}.output.dense", H, H)
            norm(f"{layer}{part}.output.LayerNorm", H)
        for suffix in ("", "_query"):
            linear(f"{layer}intermediate{suffix}.dense", INTER, H)
            linear(f"{layer}output{suffix}.dense", H, INTER)
            norm(f"{layer}output{suffix}.LayerNorm", H)
    t("Qformer.cls.predictions.bias", vocab)
    linear("Qformer.cls.predictions.transform.dense", H, H)
    norm("Qformer.cls.predictions.transform.LayerNorm", H)
    sd["Qformer.cls.predictions.decoder.weight"] = sd[q + "embeddings.word_embeddings.weight"]  # tied
    sd["Qformer.cls.predictions.decoder.bias"] = sd["Qformer.cls.predictions.bias"]
    linear("vision_proj", EMBED, H)
    linear("text_proj", EMBED, H)
    linear("itm_head", 2, H)
    sd["temp"] = torch.tensor(0.05)
    return sd


def save_lavis(path, sd: dict):
    """As LAVIS's runner saves a checkpoint (runner_base.py ``_save_checkpoint``): a dict with ``model``."""
    torch.save({"model": sd, "config": {"model": {"arch": "blip2", "model_type": "pretrain"}}, "epoch": 9}, path)
    return path


def expected_name(lavis: str) -> str:
    """Where a LAVIS tensor belongs in our Q-Former (transformers' Blip2QFormerModel + Blip2TextEmbeddings
    names), written out independently of msmedcap.models.stage1_import."""
    rules = [("Qformer.bert.embeddings.LayerNorm.", "bert.layernorm."),
             ("Qformer.bert.embeddings.", "embeddings."),
             ("Qformer.cls.predictions.transform.dense.", "itg_transform.0."),
             ("Qformer.cls.predictions.transform.LayerNorm.", "itg_transform.2."),
             ("Qformer.cls.predictions.bias", "itg_bias"),
             ("Qformer.bert.", "bert.")]
    for old, new in rules:
        if lavis.startswith(old):
            return new + lavis[len(old):].replace(".self.", ".attention.")
    return lavis


LAVIS_NOT_IMPORTED = {"Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.weight",
                      "Qformer.cls.predictions.decoder.bias"}


@pytest.mark.parametrize("branch", ["clip", "sam"])
def test_lavis_checkpoint_lands_tensor_by_tensor(tokenizers, vocab, branch, tmp_path):
    sd = lavis_state_dict(vocab, WIDTH[branch])
    sd["visual_encoder.cls_token"] = torch.zeros(1, 1, WIDTH[branch])  # a checkpoint saved with its tower
    path = save_lavis(tmp_path / "blip2_pretrained.pth", sd)
    model = build_model(config(tokenizers, f"model.{branch}.stage1_checkpoint={path}"))
    mine = model.qformers[branch].state_dict()
    imported = {k: v for k, v in sd.items() if k not in LAVIS_NOT_IMPORTED and not k.startswith("visual_encoder.")}
    assert {expected_name(k) for k in imported} == set(mine)  # every Q-Former tensor, nothing else
    for name, value in imported.items():
        assert torch.equal(mine[expected_name(name)], value.reshape(mine[expected_name(name)].shape)), name
    assert mine["temp"].shape == (1,) and mine["temp"].item() == pytest.approx(0.05)
    # the ITG decoder is the word-embedding matrix itself (tied), as LAVIS's is
    q = model.qformers[branch]
    assert torch.equal(q.embeddings.word_embeddings.weight, sd["Qformer.cls.predictions.decoder.weight"])
    other = {"clip": "sam", "sam": "clip"}[branch]  # the other branch is untouched
    assert not torch.equal(model.qformers[other].query_tokens.detach(), sd["query_tokens"])

    report = model.stage1_imports[branch]
    assert report.layout == "lavis" and report.branch == branch and not report.kept
    assert len(report.loaded) == len(mine)
    assert set(report.ignored) == LAVIS_NOT_IMPORTED | {"visual_encoder.cls_token"}
    text = report.summary()
    assert f"{len(mine)} tensors loaded" in text and "visual_encoder.cls_token" in text


def test_lavis_checkpoint_that_does_not_fit_names_the_tensors(tokenizers, vocab, tmp_path):
    sd = lavis_state_dict(vocab + 1, WIDTH["clip"])  # a vocabulary one token longer
    del sd["Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"]
    path = save_lavis(tmp_path / "bad.pth", sd)
    with pytest.raises(ConfigError) as err:
        build_model(config(tokenizers, f"model.clip.stage1_checkpoint={path}"))
    msg = str(err.value)
    assert "model.clip.stage1_checkpoint" in msg
    assert f"Qformer.bert.embeddings.word_embeddings.weight ({vocab + 1}, {H})" in msg
    assert "Qformer.cls.predictions.bias" in msg and "vocabulary" in msg
    assert "1 Q-Former tensors are not in the checkpoint: bert.encoder.layer.1.output_query.LayerNorm.bias" in msg

    sd = lavis_state_dict(vocab, WIDTH["clip"])  # layers the config does not have
    sd["Qformer.bert.encoder.layer.2.output.dense.bias"] = torch.zeros(H)
    with pytest.raises(ConfigError, match=r"Qformer\.bert\.encoder\.layer\.2\.output\.dense\.bias \(64,\): no "
                                          r"bert\.encoder\.layer\.2\.output\.dense\.bias in the clip Q-Former"):
        build_model(config(tokenizers, f"model.clip.stage1_checkpoint={save_lavis(tmp_path / 'deep.pth', sd)}"))


def test_clip_checkpoint_into_the_sam_branch_with_encoder_side_skipped(tokenizers, vocab, tmp_path):
    """The reference code's situation: a ViT-g (here: the 64-wide CLIP) stage-1 checkpoint for the SAM
    Q-Former, whose tokens are wider: ln_vision and the cross-attention keys/values cannot be taken."""
    sd = lavis_state_dict(vocab, WIDTH["clip"])
    path = save_lavis(tmp_path / "blip2_pretrained.pth", sd)
    with pytest.raises(ConfigError) as err:
        build_model(config(tokenizers, f"model.sam.stage1_checkpoint={path}"))
    msg = str(err.value)
    assert f"Qformer.bert.encoder.layer.0.crossattention.self.key.weight ({H}, 64) -> " \
           f"bert.encoder.layer.0.crossattention.attention.key.weight ({H}, 256)" in msg
    assert "ln_vision.weight (64,) -> ln_vision.weight (256,)" in msg and "stage1_skip=[encoder_side]" in msg

    torch.manual_seed(0)
    fresh = build_model(config(tokenizers)).qformers["sam"].state_dict()
    torch.manual_seed(0)
    model = build_model(config(tokenizers, f"model.sam.stage1_checkpoint={path}", "model.sam.stage1_skip=[encoder_side]"))
    mine = model.qformers["sam"].state_dict()
    kept = {"ln_vision.weight", "ln_vision.bias"} | {f"bert.encoder.layer.0.crossattention.attention.{p}.{w}"
                                                     for p in ("key", "value") for w in ("weight", "bias")}
    assert set(model.stage1_imports["sam"].kept) == kept
    for name in kept:
        assert torch.equal(mine[name], fresh[name]), name  # left at their initialisation
    for lavis, value in sd.items():
        if lavis not in LAVIS_NOT_IMPORTED and expected_name(lavis) not in kept:
            assert torch.equal(mine[expected_name(lavis)], value.reshape(mine[expected_name(lavis)].shape)), lavis


def test_sam_branch_without_ln_vision_ignores_the_checkpoints_ln_vision(tokenizers, vocab, tmp_path):
    path = save_lavis(tmp_path / "sam.pth", lavis_state_dict(vocab, WIDTH["sam"]))
    model = build_model(config(tokenizers, "model.sam.ln_vision=false", f"model.sam.stage1_checkpoint={path}"))
    assert model.qformers["sam"].ln_vision is None and model.qformers["clip"].ln_vision is not None
    assert not any(n.startswith("qformers.sam.ln_vision") for n, _ in model.trainable_named_parameters())
    ignored = model.stage1_imports["sam"].ignored
    assert ignored["ln_vision.weight"] == ignored["ln_vision.bias"] == "model.sam.ln_vision is false (no LayerNorm on its tokens)"


def test_a_pth_that_needs_unpickling_is_refused(tokenizers, vocab, tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": lavis_state_dict(vocab, WIDTH["clip"]), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ConfigError, match=r"model\.clip\.stage1_checkpoint: .*weights_only=True.*argparse\.Namespace"):
        build_model(config(tokenizers, f"model.clip.stage1_checkpoint={path}"))


# --------------------------------------------------------------------------- HF Blip2ForImageTextRetrieval
def hf_itm_dir(vocab: int, width: int, out):
    """A tiny random ``Blip2ForImageTextRetrieval`` (transformers' class; the architecture of
    Salesforce/blip2-itm-vit-g) whose Q-Former has the demo preset's shape, saved as HF saves it."""
    hf_cfg = Blip2Config(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=INTER,
                            cross_attention_frequency=FREQ, encoder_hidden_size=width, vocab_size=vocab,
                            use_qformer_text_input=True),
        num_query_tokens=QUERIES, image_text_hidden_size=EMBED)
    torch.manual_seed(1)
    hf = Blip2ForImageTextRetrieval(hf_cfg).eval()
    with torch.no_grad():  # HF's init (std 0.02, constant norms) scores every pair alike: spread them out
        hf.query_tokens.normal_(std=0.5)
        hf.vision_model.post_layernorm.weight.normal_(1.0, 0.2)
        hf.vision_model.post_layernorm.bias.normal_(std=0.2)
        for name, p in [*hf.qformer.named_parameters(), *hf.embeddings.named_parameters(),
                        *hf.vision_projection.named_parameters(), *hf.text_projection.named_parameters(),
                        *hf.itm_head.named_parameters()]:
            if "LayerNorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "embeddings" in name:
                p.normal_(std=1.0)
            else:
                p.normal_(std=0.2 if name.endswith("weight") else 0.1)
    hf.save_pretrained(out)
    return hf


@pytest.mark.parametrize("branch,ln_vision,token_mlp", [("clip", True, 0), ("sam", True, 0), ("sam", False, 0),
                                                       ("sam", True, 2)])
def test_imported_branch_reproduces_blip2_itm_similarity_and_matching(tokenizers, vocab, branch, ln_vision, token_mlp,
                                                                      tmp_path):
    """With ``token_mlp`` the adapter (not in BLIP-2) is left at its initialisation, the identity: the
    imported branch still scores as BLIP-2 does."""
    hf = hf_itm_dir(vocab, WIDTH[branch], tmp_path / "blip2-itm")
    model = build_model(config(tokenizers, f"model.{branch}.stage1_checkpoint={tmp_path / 'blip2-itm'}",
                               f"model.{branch}.ln_vision={str(ln_vision).lower()}",
                               f"model.{branch}.token_mlp={token_mlp}")).eval()
    report = model.stage1_imports[branch]
    adapter = {f"adapter.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} if token_mlp else set()
    assert report.layout == "hf" and set(report.kept) == {"temp", "itg_bias", "itg_transform.0.weight",
                                                          "itg_transform.0.bias", "itg_transform.2.weight",
                                                          "itg_transform.2.bias"} | adapter
    qf = model.qformers[branch]
    tok = load_qformer_tokenizer(tokenizers[0])(CAPTIONS, padding="max_length", truncation=True, max_length=32,
                                                return_tensors="pt")
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        vision = hf.vision_model(pixels, output_hidden_states=True)
        # with ln_vision the branch takes the tower's tokens before post_layernorm (BLIP-2's ln_vision);
        # without, it takes the tokens as they come: here the normalised ones
        tokens = vision.hidden_states[-1] if ln_vision else vision.last_hidden_state
        embeds = qf.image_embeds(tokens)

        ours = qf.similarity(embeds[:3], tok.input_ids, tok.attention_mask)
        theirs = hf(pixel_values=pixels[:3], input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                    use_image_text_matching_head=False).logits_per_image
        assert ours.shape == theirs.shape == (3, 8)
        assert ours.std() > 0.01
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

        ours = qf.itm_logits(embeds, tok.input_ids, tok.attention_mask)
        theirs = hf(pixel_values=pixels, input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                    use_image_text_matching_head=True).logits_per_image
        assert ours.shape == theirs.shape == (8, 2)
        assert ours.std(0).min() > 0.01
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_hf_opt_checkpoint_as_stage1_is_refused_with_the_right_key(tokenizers, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "opt").mkdir()
    save_file({"language_model.lm_head.weight": torch.zeros(2, 2), "qformer.layernorm.weight": torch.zeros(2)},
              str(tmp_path / "opt" / "model.safetensors"))
    with pytest.raises(ConfigError, match="Blip2ForConditionalGeneration .* model.blip2_checkpoint"):
        build_model(config(tokenizers, f"model.clip.stage1_checkpoint={tmp_path / 'opt'}"))
