"""Issue 20: frozen parts without weights are configuration errors (item 4), weight files provide every
tensor they are expected to (item 4), and frozen parts are built in their run dtype, never as a full
fp32 copy (item 1)."""
import logging

import pytest
import torch
from helpers.model_kit import demo_config, one_thread

from msmedcap.config import ConfigError, load_config
from msmedcap.models import build_model

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


# --------------------------------------------------------------------------- weightless parts
@pytest.mark.parametrize("override, key, names", [
    ("model.sam.checkpoint=null", "model.sam.checkpoint", "a checkpoint of this tiny SAM"),
    ("model.clip.pretrained=null", "model.clip.pretrained", "open_clip pretrained tag"),
    ("model.lm.name_or_path=null", "model.lm.name_or_path", "facebook/opt-2.7b"),
])
def test_a_weightless_frozen_part_is_refused_naming_its_key(override, key, names):
    with pytest.raises(ConfigError, match=rf"{key} must be set, to .*{names}.*model.allow_random_weights=true"):
        load_config("demo", [override], check_files=False)
    load_config("demo", [override, "model.allow_random_weights=true"], check_files=False)


def test_the_paper_preset_names_the_sam_checkpoint_to_download():
    with pytest.raises(ConfigError) as err:
        load_config("paper", check_files=False)
    msg = str(err.value)
    assert "model.sam.checkpoint must be set" in msg and "sam_vit_b_01ec64.pth" in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    # the other parts name hub weights (downloaded by their libraries): only SAM is missing
    assert "model.clip.pretrained" not in msg and "model.lm.name_or_path" not in msg


def test_every_weightless_part_is_named_at_once_and_the_variant_decides():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["model.sam.checkpoint=null", "model.clip.pretrained=null", "model.lm.name_or_path=null"],
                    check_files=False)
    assert all(k in str(err.value) for k in ("model.sam.checkpoint", "model.clip.pretrained", "model.lm.name_or_path"))
    load_config("demo", ["model.variant=blip2", "model.sam.checkpoint=null"], check_files=False)  # no SAM branch


def test_train_exits_2_before_any_work(tmp_path, capsys):
    from msmedcap.cli import main

    out = tmp_path / "run"
    assert main(["train", "--config", "demo", "model.sam.checkpoint=null", f"train.output_dir={out}"]) == 2
    assert "model.sam.checkpoint must be set" in capsys.readouterr().err
    assert not out.exists()


def test_an_exported_config_with_random_parts_needs_the_flag_it_was_trained_with(tokenizers):
    from msmedcap.config import config_from_dict

    data = demo_config(tokenizers).to_dict()
    assert config_from_dict(data).model.allow_random_weights is True
    data["model"]["allow_random_weights"] = False
    with pytest.raises(ConfigError, match="model.lm.name_or_path must be set"):
        config_from_dict(data)


def test_allowed_random_parts_are_logged_loudly(tokenizers, caplog):
    cfg = demo_config(tokenizers, "model.sam.checkpoint=null", "model.sam.image_size=64")
    with caplog.at_level(logging.WARNING):
        build_model(cfg.model)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "RANDOM" in r.getMessage()]
    assert len(lines) == 2 and all("random" in line for line in lines)
    assert any("SAM tiny image encoder" in line and "model.sam.checkpoint" in line for line in lines)
    assert any("LM" in line and "model.lm.name_or_path" in line for line in lines)


def test_a_model_config_built_in_code_is_refused_too(tokenizers):
    from msmedcap.models.msmedcap_model import MSMedCap

    cfg = demo_config(tokenizers).model
    cfg.allow_random_weights = False
    with pytest.raises(ConfigError, match="model.lm.name_or_path must be set"):
        MSMedCap(cfg)


# --------------------------------------------------------------------------- files that lack tensors
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved as transformers saves it: a causal LM directory that is not OPT, nor BERT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
                     ).save_pretrained(out)
    return out


def test_a_llama_directory_as_the_lm_is_refused_naming_missing_tensors(tokenizers, llama_dir):
    cfg = demo_config(tokenizers, f"model.lm.name_or_path={llama_dir}")
    with pytest.raises(ConfigError, match=r"model.lm.name_or_path: .* does not provide every tensor of OPTForCausalLM "
                                          r"\(its config says model_type 'llama'\).*missing \(model.decoder.*unexpected"):
        build_model(cfg.model)


def test_a_llama_directory_as_bert_is_refused_naming_missing_tensors(tokenizers, llama_dir):
    cfg = demo_config(tokenizers, f"model.qformer.init_from={llama_dir}")
    with pytest.raises(ConfigError, match=r"model.qformer.init_from: .* does not provide every tensor of the BERT.*"
                                          r"lacks \d+ of BertForMaskedLM's tensors.*missing \(itg_bias, embeddings.word_embeddings.weight"):
        build_model(cfg.model)


def test_a_bert_of_other_widths_is_refused(tokenizers, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    cfg = demo_config(tokenizers, f"model.qformer.init_from={tmp_path / 'bert'}")
    with pytest.raises(ConfigError, match=r"model.qformer.init_from: .*Q-Former tensors it leaves random are: \d+ missing"):
        build_model(cfg.model)


def test_a_bert_of_the_qformer_shape_initialises_every_tensor_but_what_blip2_adds(tokenizers, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from msmedcap.models.qformer import BLIP2_ADDS

    q = demo_config(tokenizers).model.qformer
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                                      num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size))
    with torch.no_grad():  # no tensor equal to the Q-Former's init (BERT's zero biases, unit LayerNorms)
        for p in bert.parameters():
            p.normal_()
    bert.save_pretrained(tmp_path / "bert")
    before = build_model(demo_config(tokenizers).model).qformers["clip"].state_dict()
    after = build_model(demo_config(tokenizers, f"model.qformer.init_from={tmp_path / 'bert'}").model
                        ).qformers["clip"].state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    kept = set(after) - changed
    assert kept and all(k.startswith(BLIP2_ADDS) or ".crossattention." in k for k in kept), sorted(kept)


def sam_checkpoint(model, path, drop=(), extra=None):
    state = {f"image_encoder.{k}": v.float() for k, v in model.encoders["sam"].encoder.state_dict().items()
             if k not in drop}
    torch.save({**state, "mask_decoder.iou_token.weight": torch.zeros(1, 32), **(extra or {})}, path)
    return path


@pytest.mark.parametrize("drop, extra, message", [
    (("neck.0.weight",), None, r"1 missing \(neck.0.weight\)"),
    ((), {"image_encoder.blocks.9.attn.qkv.weight": torch.zeros(3, 3)},
     r"1 unexpected \(image_encoder.blocks.9.attn.qkv.weight\)"),
    ((), {"text_encoder.weight": torch.zeros(3)}, r"1 unexpected \(text_encoder.weight\)"),
    ((), {"image_encoder.pos_embed": torch.zeros(1, 2, 2, 64)}, r"1 of another shape \(pos_embed \(1, 2, 2, 64\)"),
])
def test_a_sam_checkpoint_missing_or_adding_a_tensor_is_refused(tokenizers, tmp_path, drop, extra, message):
    cfg = demo_config(tokenizers, "model.variant=sam-blip2")
    path = sam_checkpoint(build_model(cfg.model), tmp_path / "sam.pth", drop, extra)
    with pytest.raises(ConfigError, match=r"model.sam.checkpoint: .*sam.pth does not provide every tensor of "
                                          r"model.sam.type=tiny's image encoder.*" + message):
        build_model(demo_config(tokenizers, "model.variant=sam-blip2", f"model.sam.checkpoint={path}").model)


def test_an_open_clip_file_missing_a_tensor_is_refused_naming_it(tokenizers, tmp_path):
    from safetensors.torch import load_file, save_file

    from msmedcap.config import resolve_asset

    state = load_file(resolve_asset("pkg://assets/open_clip/tiny-vit-demo.safetensors"))
    del state["visual.proj"]
    state["visual.extra"] = torch.zeros(2)
    save_file(state, str(tmp_path / "clip.safetensors"))
    cfg = demo_config(tokenizers, "model.variant=blip2", f"model.clip.pretrained={tmp_path / 'clip.safetensors'}")
    with pytest.raises(ConfigError, match=r"model.clip.pretrained: .*1 missing \(visual.proj\); 1 unexpected "
                                          r"\(visual.extra\)"):
        build_model(cfg.model)


def test_a_blip2_checkpoint_missing_an_lm_tensor_is_refused(tokenizers, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from msmedcap.tokenization import load_lm_tokenizer

    cfg = demo_config(tokenizers)
    q, lm = cfg.model.qformer, cfg.model.lm
    vocab = len(load_lm_tokenizer(lm.tokenizer))
    hf = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                            intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_freq,
                            encoder_hidden_size=64),
        text_config=dict(model_type="opt", vocab_size=vocab + 1, **lm.config),
        num_query_tokens=q.num_query_tokens, image_token_index=vocab))
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = next(k for k in state if k.startswith("language_model.") and "layers.1.fc1.weight" in k)
    del state[name]
    state["adapter.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = demo_config(tokenizers, "model.variant=blip2", "model.lm.num_soft_prompts=0",
                      f"model.blip2_checkpoint={tmp_path}")
    cfg.model.lm.config = {}
    with pytest.raises(ConfigError, match=r"model.blip2_checkpoint: .*1 missing \(captioner.lm.model.decoder.layers.1"
                                          r".fc1.weight\); 1 unexpected \(adapter.weight\)"):
        build_model(cfg.model)


# --------------------------------------------------------------------------- built in the run dtype
class WrittenFloat32(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest float32 tensor an op writes (an output or an in-place result) while active: what a
    build that makes a float32 copy of its weights writes, and a build in bf16 does not."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu":
                self.largest = max(self.largest, t.numel())
        return out


def test_frozen_parts_built_in_bf16_never_write_a_float32_copy_of_their_weights(tokenizers, monkeypatch):
    """Each frozen part's construction (the encoders' builders, ``build_opt``), measured inside the model's
    own build: its parameters come out in bf16, and no float32 tensor anywhere near the size of its biggest
    weight is written (building in float32, then casting, writes every weight in float32 first)."""
    from msmedcap.models import captioner, msmedcap_model

    seen = {}

    def measured(part, build):
        def run(*args, **kwargs):
            with WrittenFloat32() as mode:
                module = build(*args, **kwargs)
            params = list(module.parameters())
            seen[part] = (mode.largest, max(p.numel() for p in params), {p.dtype for p in params})
            return module
        return run

    real_spec = msmedcap_model.encoder_spec

    class MeasuredSpec:  # the registry's spec, its build measured
        def __init__(self, branch):
            self.spec = real_spec(branch)
            self.build = measured(branch, self.spec.build)

        def __getattr__(self, name):
            return getattr(self.spec, name)

    monkeypatch.setattr(msmedcap_model, "encoder_spec", MeasuredSpec)
    monkeypatch.setattr(captioner, "build_opt", measured("lm", captioner.build_opt))
    build_model(demo_config(tokenizers, "model.frozen_dtype=bf16", "model.clip.pretrained=null",
                            "model.sam.checkpoint=null").model)
    assert set(seen) == {"clip", "sam", "lm"}
    for part, (largest_fp32, biggest, dtypes) in seen.items():
        assert dtypes == {torch.bfloat16}, (part, dtypes)
        assert largest_fp32 < biggest / 4, (part, largest_fp32, biggest)


def test_bf16_frozen_weights_loaded_from_files_equal_the_fp32_build_cast(tokenizers):
    """The demo's frozen parts are packaged files: built in bf16 they hold exactly the fp32 build's values
    rounded to bf16 (one rounding either way); an fp32 build is unchanged."""
    from msmedcap.models.encoders import frozen_dtype

    shipped = ["model.lm.name_or_path=pkg://assets/opt-demo", "model.lm.tokenizer=pkg://assets/tokenizers/lm",
               "model.allow_random_weights=false"]
    fp32 = build_model(demo_config(tokenizers, "model.frozen_dtype=fp32", *shipped).model)
    bf16 = build_model(demo_config(tokenizers, "model.frozen_dtype=bf16", *shipped).model)
    assert frozen_dtype("bf16") == torch.bfloat16
    ref, got = fp32.state_dict(), bf16.state_dict()
    frozen = [k for k in ref if k.startswith(("encoders.", "captioner.lm."))]
    assert len(frozen) > 50
    for k in frozen:
        assert got[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], ref[k].to(torch.bfloat16)), k
