"""Generation through the evaluation path: batched beam search = batch-1 captions; the fused job end
to end from a run directory (predictions, scores, gallery, table); `msmedcap caption` on PNG, JPEG
and DICOM files, equal to the evaluation's caption of the same image; its errors.

One tiny fp32 model for the module, made so that its captions differ from image to image (else
comparing them proves nothing): an untrained model ignores its prefix, the demo's OPT (trained on
captions alone) says the same sentence for every image, and a random OPT at the usual init_std
the same word. So: a random OPT with init_std=0.5 (seeded, the export rebuilds it) and trainables
drawn at scale 2."""
import json
from html.parser import HTMLParser

import pytest
import torch

from msmedcap.cli import main as msmedcap_main
from msmedcap.config import load_config

pytestmark = pytest.mark.slow

OVERRIDES = ["model.frozen_dtype=fp32", "model.lm.name_or_path=null", "model.allow_random_weights=true", "model.lm.config.init_std=0.5",
             "eval.num_beams=3", "eval.min_len=3", "eval.max_len=10", "eval.batch_size=8", "data.num_workers=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory whose stage-2 export holds a tiny model's trainable weights."""
    from msmedcap.models import build_model, save_trainable

    cfg = load_config("demo", OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trainables far from init, so the queries (and captions) depend on the image
        for _, p in model.trainable_named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    run = tmp_path_factory.mktemp("run")
    save_trainable(model, run / "stage2" / "export", cfg)
    return run, model.eval(), cfg


def first_batches(cfg, n_batches):
    from msmedcap.data.loader import make_eval_loader

    out = []
    for b in make_eval_loader(cfg, cfg.data.eval, 0, 1, cfg.eval.batch_size):
        out.append(b)
        if len(out) == n_batches:
            return out
    return out


def test_batched_beam_search_equals_batch_of_one(run_dir):
    from msmedcap.eval.evaluate import generation_kwargs, sample_batch

    _, model, cfg = run_dir
    batch = first_batches(cfg, 1)[0]
    gen = generation_kwargs(cfg)
    batched = model.generate(batch, **gen)
    singles = [model.generate(sample_batch(batch, i), **gen)[0] for i in range(len(batch["key"]))]
    assert batched == singles
    assert len(set(batched)) > 1, batched  # the captions depend on the image: the comparison means something


def test_prefill_runs_once_per_sample_and_changes_no_caption(run_dir, monkeypatch):
    """Beam search's prefill runs on the batch's rows, not batch x beams, and the captions are those of
    transformers' own path (the per-beam prefill) for the same batch; the LM's forward is its own again
    afterwards."""
    import contextlib
    import functools

    from transformers import GenerationConfig, OPTForCausalLM

    from msmedcap.eval.evaluate import generation_kwargs
    from msmedcap.models import captioner

    _, model, cfg = run_dir
    batch = first_batches(cfg, 1)[0]
    gen = generation_kwargs(cfg)
    prefill_rows = []
    forward = OPTForCausalLM.forward

    @functools.wraps(forward)
    def recording(self, *args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            prefill_rows.append(kwargs["inputs_embeds"].shape[0])
        return forward(self, *args, **kwargs)

    # every step's beam scores, bit for bit, with and without it
    cap = model.captioner
    with torch.no_grad():
        prefix = cap.prefix(model.query_outputs(batch))
    config = GenerationConfig(do_sample=False, num_beams=3, min_new_tokens=2, max_new_tokens=6, output_scores=True,
                              return_dict_in_generate=True, eos_token_id=cap.eos_token_id,
                              pad_token_id=cap.tokenizer.pad_token_id)
    with captioner.prefill_once_per_sample(cap.lm, 3):
        a = cap.lm.generate(inputs_embeds=prefix, generation_config=config)
    b = cap.lm.generate(inputs_embeds=prefix, generation_config=config)
    assert len(a.scores) == len(b.scores) > 1 and all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    assert torch.equal(a.sequences, b.sequences)

    monkeypatch.setattr(OPTForCausalLM, "forward", recording)
    once = model.generate(batch, **gen)
    assert prefill_rows == [len(batch["key"])]
    assert "forward" not in vars(model.captioner.lm)
    prefill_rows.clear()
    monkeypatch.setattr(captioner, "prefill_once_per_sample", lambda lm, n: contextlib.nullcontext())
    per_beam = model.generate(batch, **gen)
    assert prefill_rows == [len(batch["key"]) * gen["num_beams"]]
    assert once == per_beam
    assert len(set(once)) > 1, once


class Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.keys = []

    def handle_starttag(self, tag, attrs):
        if tag == "tr" and dict(attrs).get("data-key"):
            self.keys.append(dict(attrs)["data-key"])


def load_launcher():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "launch" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("launch_evaluate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_run_dir_end_to_end(run_dir, capsys):
    launcher = load_launcher()
    run, model, cfg = run_dir
    assert launcher.main(["--checkpoint", str(run), "eval.max_samples=12"]) == 0
    out = run / "eval"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and len({p["key"] for p in preds}) == 12
    assert {"key", "source", "domain", "references", "prediction", "scores"} <= set(preds[0])
    scores = json.loads((out / "scores.json").read_text())
    assert scores["samples"]["total"] == 12 and scores["checkpoint"].endswith("stage2/export")
    assert scores["overall"]["n"] == 12 and scores["generation"]["num_beams"] == 3
    assert sum(s["n"] for s in scores["domain"].values()) == 12
    rows = Rows()
    rows.feed((out / "gallery.html").read_text())
    assert sorted(rows.keys) == sorted(p["key"] for p in preds)
    assert "CIDEr" in capsys.readouterr().out
    # The evaluated captions are the model's: same as generating on the same batch directly.
    batch = first_batches(cfg, 2)
    direct = dict(zip([k for b in batch for k in b["key"]],
                      [c for b in batch for c in model.generate(b, num_beams=3, min_len=3, max_len=10)]))
    assert all(direct[p["key"]] == p["prediction"] for p in preds)
    # `msmedcap score` on the written predictions reproduces the written scores.
    assert msmedcap_main(["score", str(out / "predictions.jsonl"), "--out", str(run / "rescored.json")]) == 0
    rescored = json.loads((run / "rescored.json").read_text())
    assert rescored["overall"]["CIDEr"] == pytest.approx(scores["overall"]["CIDEr"], rel=1e-12)


def test_caption_cli_png_jpeg_dicom_and_errors(run_dir, tmp_path, capsys):
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from msmedcap.data.decode import decode_sample
    from msmedcap.eval.evaluate import sample_batch
    from msmedcap.data.sources import dicom_to_png

    run, model, cfg = run_dir
    # The first eval sample's original image as PNG and JPEG, and as a DICOM.
    batch = first_batches(cfg, 1)[0]
    import webdataset as wds

    raw = next(iter(wds.WebDataset(cfg.data.eval[0], shardshuffle=False)))
    sample = decode_sample(raw, cfg.data.max_image_pixels)
    png, jpg, dcm, dcm_png = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.dcm", tmp_path / "c.png"
    sample["image"].save(png)
    sample["image"].save(jpg, quality=95)
    # A 16-bit MONOCHROME2 DICOM with a window, the usual medical kind.
    grey = (np.asarray(sample["image"]).mean(-1) * 16).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2000, 4000
    ds.PixelData = grey.tobytes()
    ds.save_as(dcm, enforce_file_format=True)
    dcm_png.write_bytes(dicom_to_png(dcm))  # what `msmedcap shards write` would have stored for it

    assert msmedcap_main(["caption", str(png), str(jpg), str(dcm), str(dcm_png), "--checkpoint", str(run),
                          "--json", "--batch-size", "3", "--set", "eval.num_beams=3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["image"] for x in lines] == [str(png), str(jpg), str(dcm), str(dcm_png)]
    assert all(x["caption"] for x in lines)
    idx = batch["key"].index(raw["__key__"])
    evaluated = model.generate(sample_batch(batch, idx), num_beams=3, min_len=3, max_len=10)[0]
    assert lines[0]["caption"] == evaluated  # same transforms and settings as the evaluation
    assert lines[2]["caption"] == lines[3]["caption"]  # DICOM read as the shard writer converts it

    def err(argv):
        assert msmedcap_main(argv) == 2
        return capsys.readouterr().err

    broken = tmp_path / "broken.png"
    broken.write_bytes(png.read_bytes()[:100])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert f"{broken}: unreadable image" in err(["caption", str(png), str(broken), "--checkpoint", str(run)])
    assert f"{text}: unreadable image" in err(["caption", str(text), "--checkpoint", str(run)])
    assert "no such file" in err(["caption", str(tmp_path / "missing.png"), "--checkpoint", str(run)])
    assert "no export" in err(["caption", str(png), "--checkpoint", str(tmp_path)])
    bad_dcm = tmp_path / "bad.dcm"
    bad_dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\1\2\3")
    assert f"{bad_dcm}: unreadable image" in err(["caption", str(bad_dcm), "--checkpoint", str(run)])
    assert "only eval.* and data.*" in err(["caption", str(png), "--checkpoint", str(run), "--set", "model.variant=blip2"])
