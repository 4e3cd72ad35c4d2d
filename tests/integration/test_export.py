"""`msmedcap export --bundle` on a real tiny training run of the demo (msmedcap variant, both stages, the
end-of-run evaluation): the directory reloads with msmedcap.from_pretrained and captions and evaluates as
the run's export does; its model card is rendered from the run's summary.json; bad inputs exit 2 with
nothing written; --push-to-hub goes through huggingface_hub's create_repo + upload_folder to a local HTTP
server that answers the Hub's repo-create, preupload and commit endpoints (regular, non-LFS uploads)."""
import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from helpers.runs import TINY_RUN

from msmedcap.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # one real training run (~1 min here)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "launch/pretrain.py", f"train.output_dir={out}", *TINY_RUN], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "msmedcap-demo"
    assert main(["export", str(run_dir), "--bundle", str(out)]) == 0
    return out


def test_bundle_reloads_with_every_tensor_and_captions_and_evaluates_the_same(run_dir, bundle, tmp_path):
    import msmedcap
    from msmedcap.eval.caption import caption_files
    from msmedcap.models import load_from_export

    assert {"config.json", "model.safetensors", "README.md", "lm_tokenizer", "qformer_tokenizer"} <= \
        {p.name for p in bundle.iterdir()}
    stored = json.loads((bundle / "config.json").read_text())["config"]["model"]
    assert stored["clip"]["pretrained"] is None and stored["sam"]["checkpoint"] is None  # no weight file named
    assert stored["lm"]["name_or_path"] is None
    model, cfg = msmedcap.from_pretrained(bundle)
    original, _ = load_from_export(run_dir / "stage2/export")
    a, b = model.state_dict(), original.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("encoders.sam.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # frozen parts and trainables, bit for bit

    images = demo_images(tmp_path, 3)
    ours = caption_files(images, str(run_dir / "stage2/export"))
    theirs = caption_files(images, str(bundle))
    assert theirs == ours and all(c for _, c in ours)

    ev = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(bundle), "--out", str(ev), "eval.max_samples=8",
                 "eval.num_beams=1", "eval.gallery=false"]) == 0
    mine = {r["key"]: r["prediction"] for r in map(json.loads, (ev / "predictions.jsonl").read_text().splitlines())}
    runs = {r["key"]: r["prediction"] for r in map(json.loads, (run_dir / "eval/predictions.jsonl").read_text().splitlines())}
    assert mine == runs  # the run's own end-of-training evaluation


def demo_images(tmp_path, n) -> list:
    """The first ``n`` images of the demo's general eval shard, as files."""
    import tarfile

    paths = []
    with tarfile.open(REPO / "shards/demo/general-eval-000.tar") as tar:
        for member in tar:
            if member.name.endswith((".png", ".jpg")) and len(paths) < n:
                p = tmp_path / Path(member.name).name
                p.write_bytes(tar.extractfile(member).read())
                paths.append(str(p))
    return paths


def test_the_demo_presets_feature_cache_is_the_runs_own(run_dir):
    """``model.feature_cache: auto`` (the demo preset) is OUTPUT_DIR/feature-cache: the trainer resolves it,
    config.yaml names it, both stages fill one store per encoder (stage 2 reads its rows back); a model
    built outside a trainer has no cache."""
    import yaml

    from msmedcap.config import load_config
    from msmedcap.models import build_model

    cache = run_dir / "feature-cache"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["feature_cache"] == str(cache)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["clip", "sam"]
    for store in cache.iterdir():
        rows = [line for f in store.glob("index-*.tsv") for line in f.read_text().splitlines()]
        assert rows and len(rows) == len({r.split("\t")[0] for r in rows})  # each image once
    assert load_config("demo").model.feature_cache == "auto"
    assert build_model(load_config("demo").model).feature_cache is None


def test_card_renders_the_runs_summary(run_dir, bundle):
    from huggingface_hub import ModelCard

    summary = json.loads((run_dir / "summary.json").read_text())
    card = ModelCard.load(bundle / "README.md")
    assert card.data.pipeline_tag == "image-to-text" and "msmedcap" in card.data.tags
    text = card.text
    for stage in summary["stages"]:
        assert f"| {stage['stage']} | {stage['steps_done']}/{stage['total_steps']} | {stage['first_loss']:.4f}" in text
    scores = json.loads((run_dir / "eval/scores.json").read_text())
    assert f"| this model | {scores['overall']['Bleu_1']:.4f} |" in text
    assert repr(summary["evaluation"]["baseline_caption"]) in text
    assert f"CIDEr {summary['evaluation']['baseline_CIDEr']:.4f}" in text
    assert "Findings accuracy" in text and "| background |" in text
    assert "shards/demo/medical-train-{000..003}.tar::3" in text  # the demo preset's mix, as trained
    assert "Apache-2.0" in text and "Not a medical device" in text


def test_bad_inputs_exit_2_with_nothing_written(run_dir, bundle, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "outs"
    parent.mkdir()
    empty = tmp_path / "not-an-export"
    empty.mkdir()
    assert main(["export", str(empty), "--bundle", str(parent / "a")]) == 2
    assert "no export" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--hf", str(parent / "b")]) == 2  # the msmedcap variant has SAM
    assert "has a SAM branch" in capsys.readouterr().err
    assert list(parent.iterdir()) == []
    # an existing export is neither replaced nor touched without --overwrite
    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    assert main(["export", str(run_dir), "--bundle", str(bundle)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before
    # --push-to-hub without a token: refused before the model is built
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["export", str(run_dir), "--bundle", str(parent / "c"), "--push-to-hub", "me/model"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert list(parent.iterdir()) == []


def test_a_bundle_missing_a_tensor_is_refused(bundle, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    import msmedcap
    from msmedcap.config import ConfigError

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    state = load_file(broken / "model.safetensors")
    del state["encoders.sam.encoder.neck.0.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ConfigError, match="neck.0.weight"):
        msmedcap.from_pretrained(broken)


class LocalHub(BaseHTTPRequestHandler):
    """The Hub endpoints huggingface_hub's create_repo and upload_folder call, answering "regular" for
    every file (content inline in the commit's NDJSON, no LFS/xet), keeping what each commit adds."""
    repos: dict = {}

    def _json(self, data, status=200):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        assert self.headers.get("Authorization") == "Bearer hf_local_test"
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "repos"] and parts[2] == "create":
            data = json.loads(body)
            repo = f"{data.get('organization') or 'me'}/{data['name']}"
            self.repos.setdefault(repo, {})
            return self._json({"url": f"http://{self.headers['Host']}/{repo}"})
        if parts == ["api", "validate-yaml"]:  # the README's metadata block, which the Hub checks
            import yaml

            text = json.loads(body)["content"]
            meta = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else None
            errors = [] if isinstance(meta, dict) else [{"message": "no YAML metadata block"}]
            return self._json({"errors": errors, "warnings": []}, 400 if errors else 200)
        repo = "/".join(parts[2:4])
        if parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if parts[4] == "commit":
            for line in body.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    self.repos[repo][entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            return self._json({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/0123abcd",
                               "commitOid": "0123abcd" * 5})
        return self._json({"error": f"not served: {self.path}"}, 404)

    def log_message(self, *args):
        pass


def test_push_to_hub_uploads_the_folder_through_huggingface_hub(run_dir, tmp_path, monkeypatch, capsys):
    server = HTTPServer(("127.0.0.1", 0), LocalHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_TOKEN", "hf_local_test")
        out = tmp_path / "pushed"
        endpoint = f"http://127.0.0.1:{server.server_port}"
        assert main(["export", str(run_dir), "--bundle", str(out), "--push-to-hub", "me/msmedcap-demo",
                     "--endpoint", endpoint]) == 0
    finally:
        server.shutdown()
    assert "pushed to me/msmedcap-demo" in capsys.readouterr().out
    uploaded = LocalHub.repos["me/msmedcap-demo"]
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert uploaded == local and "model.safetensors" in uploaded
