"""What msmedcap.models.lm_families decides per LM without building it: the caption's end token, the family
of a config, the prompt through a chat template (opt-in), and the configuration errors, each naming its key."""
import json

import pytest

from msmedcap.config import load_config, validate
from msmedcap.errors import ConfigError
from msmedcap.models.lm_families import CausalLM, Seq2SeqLM, caption_end, family_of, prompt_ids
from msmedcap.models.lm_settings import LMConfig, bare_config, pretrained_config
from msmedcap.tokenization import encode_lm_captions, load_lm_tokenizer

TOK = "pkg://assets/tokenizers/lm"  # the demo's byte-level BPE: </s> is its EOS


def bare(*extra, lm_config=None):
    """The demo with a random LM; ``lm_config`` replaces the demo's OPT ``model.lm.config`` (an override would
    merge into it), validated as load_config validates."""
    cfg = load_config("demo", ["model.lm.name_or_path=null", "model.allow_random_weights=true", *extra],
                      check_files=False)
    if lm_config is not None:
        cfg.model.lm.config = lm_config
        validate(cfg, check_files=False)
    return cfg


def family(lm_config: dict):
    return family_of(bare_config(LMConfig(name_or_path=None, config=lm_config)), "key", "source")


def test_opt_ends_captions_with_a_newline_and_other_families_with_their_eos():
    tok = load_lm_tokenizer(TOK)
    assert caption_end(load_config("demo").model, tok) == "\n"  # the demo's OPT directory
    assert caption_end(bare().model, tok) == "\n"  # a bare config without model_type is OPT
    llama = bare(lm_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 2})
    assert caption_end(llama.model, tok) == "</s>" == tok.eos_token
    assert caption_end(bare("model.lm.caption_end='.'").model, tok) == "."  # configured: any family
    targets = encode_lm_captions(tok, ["a red circle", "two blue squares on white"], 32, "</s>")
    last = targets["attention_mask"].sum(1) - 1
    assert targets["input_ids"][[0, 1], last].tolist() == [tok.eos_token_id] * 2


def test_a_caption_end_of_several_tokens_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"model.lm.caption_end: 'the end' must be one token"):
        caption_end(bare("model.lm.caption_end='the end'").model, load_lm_tokenizer(TOK))


def test_families_follow_the_config_class():
    assert family({"model_type": "gpt2", "n_embd": 64}) is CausalLM
    assert family({}) is CausalLM  # OPT
    assert family({"model_type": "t5", "d_model": 64}) is Seq2SeqLM
    # bart is in transformers' causal mapping too (BartForCausalLM); encoder-decoder, it is seq2seq here
    assert family({"model_type": "bart", "d_model": 64}) is Seq2SeqLM


def test_a_vision_model_type_as_the_lm_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.lm.config.model_type must be a model type transformers builds "
                                          r"as AutoModelForCausalLM or AutoModelForSeq2SeqLM.*'vit'"):
        bare(lm_config={"model_type": "vit"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    pretrained_config.cache_clear()
    with pytest.raises(ConfigError, match=r"model.lm.name_or_path: .* has no config transformers can read"):
        load_config("demo", [f"model.lm.name_or_path={tmp_path}"])


def test_the_chat_template_is_opt_in_and_renders_the_prompt_as_a_user_turn(tmp_path):
    tok = load_lm_tokenizer(TOK)
    lm = bare("model.lm.chat_template=true").model.lm
    with pytest.raises(ConfigError, match="model.lm.chat_template: the tokenizer .* has no chat template"):
        prompt_ids(lm, tok)
    with_template = load_lm_tokenizer.__wrapped__(TOK)  # a fresh copy: the cached one stays template-free
    with_template.chat_template = ("{% for m in messages %}<s>user: {{ m['content'] }}</s>{% endfor %}"
                                   "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    ids = prompt_ids(lm, with_template)
    assert with_template.decode(ids) == f"<s>user: {lm.prompt}</s><s>assistant:"
    lm.chat_template = False
    assert prompt_ids(lm, with_template) == tok(lm.prompt).input_ids  # off: bos + prompt, as BLIP-2 OPT
