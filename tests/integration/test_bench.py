"""The frozen-feature cache (exact features, hits skip the encoder, shared and crash-safe store) and the
benchmark's run on the demo preset (writes its JSON; no timings asserted)."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import torch

from msmedcap.config import load_config
from msmedcap.data.loader import make_eval_loader
from msmedcap.models import build_model
from msmedcap.models.feature_cache import FeatureStore, attach_feature_cache
from helpers.model_kit import one_thread

pytestmark = pytest.mark.slow

EVAL_SHARD = "shards/demo/medical-eval-000.tar"


_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def first_batch(cfg, n: int = 6) -> dict:
    return next(iter(make_eval_loader(cfg, [EVAL_SHARD], 0, 1, n)))


def test_loader_keys_are_the_sha256_of_the_encoded_image_bytes(tmp_path):
    cfg = load_config("demo", [f"model.feature_cache={tmp_path}"])
    batch = first_batch(cfg)
    with tarfile.open(EVAL_SHARD) as tar:
        images = {m.name.rsplit(".", 1)[0]: tar.extractfile(m).read() for m in tar
                  if m.name.endswith((".png", ".jpg"))}
    assert batch["image_sha256"] == [hashlib.sha256(images[k]).hexdigest() for k in batch["key"]]
    assert "image_sha256" not in first_batch(load_config("demo", ["model.feature_cache=null"]))  # no cache, no hashing
    assert "image_sha256" not in first_batch(load_config("demo"))  # auto: a trainer's, none here


def test_cached_features_equal_fresh_ones_and_a_hit_skips_the_encoder(tmp_path):
    """A miss is encoded alone, so its row is the image's own and a run's numbers do not depend on the
    cache's state: cold, warm, partly warm (rows lost to a kill) all give the same rows bit for bit."""
    cfg = load_config("demo", [f"model.feature_cache={tmp_path / 'cache'}"])
    batch = first_batch(cfg)
    torch.manual_seed(0)  # the same trainables in both builds (frozen parts are seeded by the model)
    fresh_model = build_model(load_config("demo").model).eval()

    def alone(b, data):  # each image encoded on its own, without a cache
        return torch.cat([fresh_model.encode(data, b, torch.tensor([i])) for i in range(len(data["key"]))])

    fresh = {b: alone(b, batch) for b in fresh_model.branches}

    torch.manual_seed(0)
    model = build_model(cfg.model).eval()  # the config switch attaches the cache
    cache = model.feature_cache
    calls = {b: 0 for b in model.branches}
    for b in model.branches:
        model.encoders[b].register_forward_pre_hook(lambda *_, b=b: calls.__setitem__(b, calls[b] + 1))
    first = {b: model.encode(batch, b) for b in model.branches}  # misses: computed one by one and stored
    assert calls == {"clip": 6, "sam": 6} and cache.misses == {"clip": 6, "sam": 6}
    second = {b: model.encode(batch, b) for b in model.branches}  # hits: no encoder call
    assert calls == {"clip": 6, "sam": 6} and cache.hits == {"clip": 6, "sam": 6}
    for b in model.branches:
        assert second[b].dtype == fresh[b].dtype and torch.equal(first[b], fresh[b]) and torch.equal(second[b], fresh[b])
    torch.manual_seed(0)
    cold = build_model(load_config("demo", [f"model.feature_cache={tmp_path / 'cold'}"]).model).eval()
    assert torch.equal(model.stage2_loss(batch)["loss"], cold.stage2_loss(batch)["loss"])  # warm cache = cold one

    # stage 1 encodes only the routed rows (medical -> sam): served from the same store
    index = torch.tensor([1, 4])
    assert torch.equal(model.encode(batch, "sam", index), fresh["sam"][index])
    assert calls["sam"] == 6

    # a partial hit computes only the misses, to the same rows; a fresh process (a new cache object) finds
    # the rows on disk
    other = next(iter(make_eval_loader(cfg, [EVAL_SHARD], 0, 1, 9)))  # 6 known + 3 new
    reopened = attach_feature_cache(model, tmp_path / "cache")
    mixed = model.encode(other, "sam")
    assert reopened.hits["sam"] == 6 and reopened.misses["sam"] == 3 and calls["sam"] == 9
    assert torch.equal(mixed, alone("sam", other))

    # another encoder (other weights or size) gets its own store: never a stale hit
    changed = load_config("demo", [f"model.feature_cache={tmp_path / 'cache'}", "model.sam.image_size=64",
                                   "model.sam.checkpoint=null", "model.allow_random_weights=true"])  # the shipped SAM is for 128 px
    other_model = build_model(changed.model)
    assert other_model.feature_cache.stores["sam"].dir != cache.stores["sam"].dir
    assert len(other_model.feature_cache.stores["sam"]) == 0
    assert other_model.feature_cache.stores["clip"].dir == cache.stores["clip"].dir


def test_store_ignores_a_torn_write_and_refuses_a_mismatched_identity(tmp_path):
    ident = {"encoder": "x"}
    store = FeatureStore(tmp_path, ident, (2, 3), torch.float16)
    rows = torch.randn(2, 2, 3).half()
    store.put(["a", "b"], rows)
    with open(store.data_path, "ab") as f:  # a writer killed mid-row and mid-index-line
        f.write(b"\x00" * 5)
    with open(store.index_path, "ab") as f:
        f.write(b"c\t12")
    again = FeatureStore(tmp_path, ident, (2, 3), torch.float16)
    hit, feats = again.get(["a", "c", "b"])
    assert hit.tolist() == [True, False, True] and torch.equal(feats, rows)
    again.put(["c"], rows[:1] + 1)
    hit, feats = FeatureStore(tmp_path, ident, (2, 3), torch.float16).get(["c", "a"])
    assert hit.all() and torch.equal(feats[0], rows[0] + 1) and torch.equal(feats[1], rows[0])
    with pytest.raises(ValueError, match="identity"):
        FeatureStore(tmp_path, {"encoder": "y"}, (2, 3), torch.float16)


def test_benchmark_runs_on_the_demo_preset_and_writes_its_json(tmp_path):
    from msmedcap.bench import main

    out = tmp_path / "bench.json"
    assert main(["--preset", "demo", "--parts", "step,cache,hf", "--variants", "msmedcap", "--batch", "2",
                 "--iters", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"]["type"] == "cpu" and res["peak"]["tflops"] > 0
    steps = {(r["variant"], r["stage"]): r for r in res["step"]}
    assert set(steps) == {("msmedcap", 1), ("msmedcap", 2)}
    for row in steps.values():
        assert row["samples_per_s"] > 0 and 0 < row["mfu"] and row["flops_per_sample"] > 0
        assert set(row["split_s"]) == {"encoders", "qformers_fwd_bwd", "opt_fwd_bwd", "optimizer", "total"}
    assert steps[("msmedcap", 2)]["split_s"]["opt_fwd_bwd"] > 0 and steps[("msmedcap", 1)]["split_s"]["opt_fwd_bwd"] == 0
    cache = res["cache"]
    from msmedcap.models.encoders import frozen_dtype

    size = frozen_dtype(load_config("demo").model.frozen_dtype).itemsize  # the demo's frozen encoders' dtype
    assert cache["hits_during_cached_steps"] > 0 and cache["bytes_per_image"] == {"clip": 17 * 64 * size,
                                                                                   "sam": 32 * 256 * size}
    assert res["hf"]["ratio"] > 0 and res["hf"]["transformers"]["params"]["frozen"] > 0


def test_gpu_check_runs_every_section_on_this_cpu(tmp_path):
    """The GPU check (msmedcap bench --parts gpu) at the demo's shapes on CPU: every section records
    numbers (none failed), the encoders' half-precision errors and SAM's neck deviation, steps with the
    planner's prediction beside them, batched vs batch-1 generation, collectives; JSON and Markdown."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "msmedcap.cli", "bench", "--preset", "demo", "--parts", "gpu",
                           "--gpu-batches", "2", "--gen-batches", "2", "--iters", "1", "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench-gpu/gpu_check.json").read_text())
    for name in ("collectives", "encoders", "steps", "generate"):
        assert not (isinstance(r[name], dict) and ("error" in r[name] or "skipped" in r[name])), r[name]
    assert r["encoders"]["sam"]["fp16"]["finite"] and r["encoders"]["sam"]["fp16"]["relative_error"] < 0.01
    assert 0 < r["encoders"]["sam"]["fp16"]["neck_max_deviation"] < 255.9
    assert [(s["stage"], s["micro_batch"]) for s in r["steps"]] == [(1, 2), (2, 2)]
    assert all(s["planned_peak_gib"] > 0 and s["flops_per_sample"] > 0 for s in r["steps"])
    assert r["generate"][0]["batch"] == 2 and r["generate"][0]["speedup"] > 0
    assert r["collectives"]["all_gather_object"] and r["collectives"]["all_reduce_ok"]
    assert "| stage | micro batch |" in (tmp_path / "bench-gpu/gpu_check.md").read_text()
