"""Every LM family as the captioner's frozen LM (msmedcap/models/lm_families.py), on the demo (its encoders,
shards and LM tokenizer) with a tiny random LM of each family saved by ``save_pretrained`` (tests/lm_kit.py):
the LM loads every tensor of its directory, stage 2 trains on demo batches, captions end with the family's
end token, and batched beam search gives the captions of batch 1."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.lm_kit import DEMO_LM_TOKENIZER, FAMILIES, save_tiny_lm
from helpers.model_kit import one_thread
from safetensors.torch import load_file

from msmedcap.config import ConfigError, load_config
from msmedcap.models import build_model
from msmedcap.tokenization import load_lm_tokenizer

REPO = Path(__file__).resolve().parents[2]
_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    tok = load_lm_tokenizer(DEMO_LM_TOKENIZER)
    root = tmp_path_factory.mktemp("lms")
    return {f: save_tiny_lm(f, root / f, tok) for f in FAMILIES}


@pytest.fixture(scope="module")
def demo_batches():
    """Two batches of 8 from the demo's train shards, as the loader yields them (tokenized for the OPT
    convention; each test re-tokenizes the captions for its family through the loader's own collate)."""
    from msmedcap.data.loader import make_eval_loader

    cfg = load_config("demo", ["eval.batch_size=8"])
    out = []
    for batch in make_eval_loader(cfg, cfg.data.train, 0, 1, 8):
        out.append(batch)
        if len(out) == 2:
            return out


def family_config(lm_dir, *extra):
    return load_config("demo", [f"model.lm.name_or_path={lm_dir}", "model.frozen_dtype=fp32", *extra])


def retokenized(cfg, batch):
    """``batch`` with its LM targets as the loader tokenizes them for ``cfg``'s LM (its caption end)."""
    from msmedcap.data.loader import SampleProcessor
    from msmedcap.tokenization import encode_lm_captions

    proc = SampleProcessor(cfg)
    lm = encode_lm_captions(proc.lm_tok, batch["caption"], proc.max_caption_len, proc.caption_end)
    return {**batch, "lm_input_ids": lm["input_ids"], "lm_attention_mask": lm["attention_mask"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lm_holds_every_tensor_of_its_directory(family, lm_dirs):
    """The bug this fixes: a Llama directory loaded into OPTForCausalLM kept 7 of 30 tensors."""
    model = build_model(family_config(lm_dirs[family]).model)
    mine = model.captioner.lm.state_dict()
    saved = load_file(lm_dirs[family] / "model.safetensors")
    assert saved and set(saved) <= set(mine)
    for name, value in saved.items():
        assert torch.equal(mine[name], value), name


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_2_trains_each_family_on_demo_batches(family, lm_dirs, demo_batches):
    cfg = family_config(lm_dirs[family])
    model = build_model(cfg.model)
    tok = model.captioner.tokenizer
    end = "\n" if family == "opt" else tok.eos_token  # OPT keeps BLIP-2 OPT's "\n"; the others their EOS
    assert model.captioner.eos_token_id == tok.convert_tokens_to_ids(tok.tokenize(end))[0]
    batches = [retokenized(cfg, b) for b in demo_batches]
    last = batches[0]["lm_attention_mask"].sum(1) - 1
    assert (batches[0]["lm_input_ids"][torch.arange(8), last] == model.captioner.eos_token_id).all()

    frozen = {n: p.detach().clone() for n, p in model.captioner.lm.named_parameters()}
    model.set_stage(2)
    model.train()
    optimizer = torch.optim.AdamW([p for _, p in model.stage_named_parameters(2)], lr=2e-3)

    def loss(batch):
        return model.stage2_loss(batch)["loss"]

    with torch.no_grad():
        before = [loss(b).item() for b in batches]
    for step in range(12):
        optimizer.zero_grad()
        loss(batches[step % 2]).backward()
        optimizer.step()
    with torch.no_grad():
        after = [loss(b).item() for b in batches]
    assert all(a < b - 0.01 for a, b in zip(after, before)), (before, after)  # both batches, not just the last
    for n, p in model.captioner.lm.named_parameters():  # frozen, bit for bit
        assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_beam_search_gives_the_captions_of_batch_1(family, demo_batches, tmp_path, monkeypatch):
    lm_dir = save_tiny_lm(family, tmp_path / family, load_lm_tokenizer(DEMO_LM_TOKENIZER), std=0.5)
    model = build_model(family_config(lm_dir).model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trainables far from init, so the queries (and captions) depend on the image
        for n, p in model.trainable_named_parameters():
            if ".adapter." not in n:  # the token adapter stays the identity: at std 2 its MLP swamps the tokens
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    batch = demo_batches[0]
    lm_class, prefill_rows = type(model.captioner.lm), []
    forward = lm_class.forward

    @functools.wraps(forward)
    def recording(self, *args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            prefill_rows.append(kwargs["inputs_embeds"].shape[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(lm_class, "forward", recording)
    with torch.no_grad():
        features = {b: model.encode(batch, b) for b in model.branches}
        kwargs = dict(num_beams=3, min_len=2, max_len=10)
        together = model.generate({}, image_features=features, **kwargs)
    # causal: the prefix runs once per sample, not per beam; T5: the encoder reads it (outside the LM's forward)
    assert prefill_rows == ([] if family == "t5" else [len(batch["key"])])
    with torch.no_grad():
        alone = [model.generate({}, image_features={b: f[i:i + 1] for b, f in features.items()}, **kwargs)[0]
                 for i in range(len(together))]
    assert together == alone
    assert len(set(together)) > 1, together


def test_an_lm_directory_of_no_lm_family_is_refused_before_any_work(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model.lm.name_or_path must be a model type transformers builds as "
                                          r"AutoModelForCausalLM or AutoModelForSeq2SeqLM .*model_type 'vit'"):
        load_config("demo", [f"model.lm.name_or_path={tmp_path}"])  # validation, before any model is built


@pytest.mark.slow
def test_t5_trains_and_evaluates_through_the_trainer(lm_dirs, tmp_path):
    """`msmedcap train` stage 2 (DeepSpeed ZeRO-2 engine, one process) with Flan-T5's layout as the LM: the
    loss falls, the export holds only the trainables, and the end-of-training evaluation captions every sample."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "msmedcap.cli", "train", "--config", "demo", f"train.output_dir={out}",
           f"model.lm.name_or_path={lm_dirs['t5']}", "train.stage=2", "train.stage2.steps=16",
           "train.stage2.micro_batch_size=8", "train.stage2.warmup_steps=0", "train.stage2.lr=3e-3",
           "train.log_every=1", "train.ckpt_every=100", "data.shuffle_buffer=16", "data.num_workers=1",
           "eval.max_samples=8", "eval.num_beams=2", "eval.gallery=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r.get("stage") == 2 and "loss" in r]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4]), losses
    export = load_file(out / "stage2" / "export" / "trainable.safetensors")
    assert export and not any(k.startswith("captioner.lm.") for k in export)
    predictions = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8

    # `msmedcap caption` on the run: the export rebuilds the T5 from model.lm.name_or_path
    import numpy as np
    from PIL import Image

    from msmedcap.eval.caption import caption_files
    from msmedcap.models import load_from_export

    model, _ = load_from_export(out / "stage2" / "export")
    assert type(model.captioner.lm).__name__ == "T5ForConditionalGeneration"
    for name, p in model.trainable_named_parameters():
        assert torch.equal(p.detach().cpu(), export[name].to(p.dtype)), name
    images = []
    for i in range(2):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images[-1])
    captions = caption_files([str(p) for p in images], str(out), ["eval.num_beams=2"])
    assert [path for path, _ in captions] == [str(p) for p in images] and all(isinstance(c, str) for _, c in captions)


def test_the_exports_that_hold_only_opt_refuse_another_lm_before_any_work(lm_dirs, tmp_path, capsys):
    """`msmedcap export --hf` writes BLIP-2 OPT's layout and `--bundle` an OPTConfig: a T5 captioner is refused
    by both (exit 2, naming model.lm), nothing written. (The run's own export serves it: the trainer test.)"""
    from msmedcap.cli import main
    from msmedcap.models import save_trainable

    cfg = family_config(lm_dirs["t5"], "model.variant=blip2", "model.lm.num_soft_prompts=0")
    save_trainable(build_model(cfg.model), tmp_path / "export", cfg)
    (tmp_path / "outs").mkdir()
    for kind in ("--hf", "--bundle"):
        assert main(["export", str(tmp_path / "export"), kind, str(tmp_path / "outs" / "out")]) == 2
        assert f"export {kind}: model.lm is 't5'" in capsys.readouterr().err
        assert list((tmp_path / "outs").iterdir()) == []
