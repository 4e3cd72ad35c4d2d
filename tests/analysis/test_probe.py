"""`msmedcap probe` (msmedcap.analysis.probe): the logistic-regression probe on toy features (separable:
~1.0, noise: ~chance, multiset labels through count heads), labels from the findings parsers, and
the whole probe end to end on a tiny demo-shaped model trained for two steps (probe.json's keys,
attention shares that sum to 1 per layer, the leave-one-branch-out runs, the run's own captions).
No numbers of the demo's pre-trained assets are assumed: the LM is random, the encoders whatever
the demo preset ships."""
import json

import pytest
import torch

from msmedcap.analysis import probe as P
from helpers.model_kit import one_thread

pytestmark = pytest.mark.slow

DEMO_CT = "axial ct of the abdomen showing two small lesions in the left kidney with irregular margins."


_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def toy(n, d, classes, separable, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g)
    if separable:  # each class around its own random mean, many noise sds apart
        means = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 2.0
        x = x + means[y]
    return x, [f"c{int(v)}" for v in y]


@pytest.mark.parametrize("d", [20, 400])  # 400 > samples: the kernel form
def test_probe_reads_a_linearly_separable_feature(d):
    xtr, ytr = toy(200, d, 3, True, 0)
    xte, yte = toy(300, d, 3, True, 1)
    r = P.probe_accuracy(xtr, ytr, xte, yte)
    assert r["accuracy"] >= 0.97, r
    assert r["classes"] == 3 and r["heads"] == 1 and r["l2"] in P.L2_GRID


@pytest.mark.parametrize("d", [20, 400])
def test_probe_is_at_chance_on_noise(d):
    xtr, ytr = toy(200, d, 2, False, 2)
    xte, yte = toy(1000, d, 2, False, 3)
    assert 0.4 <= P.probe_accuracy(xtr, ytr, xte, yte)["accuracy"] <= 0.6


def test_probe_reproducible_and_unseen_test_labels_count_wrong():
    xtr, ytr = toy(100, 10, 2, True, 4)
    xte, yte = toy(50, 10, 2, True, 5)
    assert P.probe_accuracy(xtr, ytr, xte, yte) == P.probe_accuracy(xtr, ytr, xte, yte)
    half = P.probe_accuracy(xtr, ytr, xte, yte[:25] + ["never seen"] * 25)["accuracy"]
    assert half <= 0.5
    one = P.probe_accuracy(xtr, ["only"] * 100, xte, ["only"] * 40 + ["other"] * 10)
    assert one["accuracy"] == pytest.approx(0.8) and one["l2"] is None
    assert P.majority(["a", "b", "b"], ["b", "a", "b", "b"]) == {"label": "b", "rate": 0.75}


def test_multiset_labels_get_one_count_head_per_kind():
    labels = [json.dumps(v) for v in ([[2, "red", "circle"]], [[1, "red", "circle"], [1, "blue", "square"]],
                                      [[1, "blue", "square"]])]
    test = [json.dumps([[1, "blue", "square"]]), json.dumps([[3, "red", "circle"]]), json.dumps([[1, "green", "square"]])]
    train, held, sizes = P.encode_labels(labels, test)
    assert sizes == [2, 3]  # (blue, square): counts {0, 1}; (red, circle): {0, 1, 2}
    assert train.tolist() == [[0, 2], [1, 1], [1, 0]]
    assert held.tolist() == [[1, 0], [0, -1], [-1, -1]]  # a count or a kind never seen: cannot be right
    # a probe that reads both kinds from the features gets the multiset right
    g = torch.Generator().manual_seed(6)
    counts = torch.randint(0, 3, (400, 2), generator=g)
    x = torch.cat([counts.double() * 4, torch.randn(400, 8, generator=g, dtype=torch.double)], 1)
    ys = [json.dumps([[int(c), k, "x"] for c, k in zip(row, ("a", "b")) if c]) for row in counts]
    r = P.probe_accuracy(x[:300], ys[:300], x[300:], ys[300:])
    assert r["heads"] == 2 and r["accuracy"] >= 0.95 and r["head_accuracy"] >= 0.95


def test_labels_from_the_findings_parsers():
    assert P.sample_labels("demo-ct", DEMO_CT) == {"modality": "ct", "lesion_present": "True", "count": "2",
                                                   "size": "small", "side": "left", "margin": "irregular"}
    assert P.sample_labels("demo-xray", "chest x-ray with no focal lesion.") == {"modality": "xray",
                                                                                "lesion_present": "False"}
    assert P.sample_labels("demo-general", "two red circles on a black background.") == {
        "background": "black", "objects": json.dumps([[2, "red", "circle"]])}
    assert P.sample_labels("demo-ct", "not the grammar") is None
    assert P.sample_labels("roco", "Axial CT shows a mass in the left lobe.") == {
        "lexicon_modality": "ct", "lexicon_laterality": "left"}


def test_count_sketch_is_a_seeded_linear_map():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(7))
    a, b = P.count_sketch(x, 64), P.count_sketch(x, 64)
    assert a.shape == (5, 64) and torch.equal(a, b)
    assert torch.allclose(P.count_sketch(2 * x[:2] + x[2:4], 64), 2 * a[:2] + a[2:4], atol=1e-5)


# --------------------------------------------------------------------------- end to end
OVERRIDES = ["model.frozen_dtype=fp32", "model.lm.name_or_path=null", "model.allow_random_weights=true", "model.lm.config.init_std=0.5",
             "eval.max_len=8", "eval.min_len=2", "data.num_workers=0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory: a tiny demo-shaped msmedcap model after two stage-2 steps, its export, and an
    evaluation's predictions.jsonl for a few eval samples."""
    from msmedcap.config import load_config
    from msmedcap.eval.findings import judge_record
    from msmedcap.models import build_model, save_trainable

    cfg = load_config("demo", OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    params = [p for _, p in model.trainable_named_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    for batch in list(P.quota_batches(cfg, cfg.data.train, 8, limit=16)):
        opt.zero_grad()
        model.stage2_loss(batch)["loss"].backward()
        opt.step()
    run = tmp_path_factory.mktemp("run")
    save_trainable(model, run / "stage2" / "export", cfg)
    records = []
    for batch in P.quota_batches(cfg, cfg.data.eval, 8, limit=8):
        for key, source, caption in zip(batch["key"], batch["source"], batch["caption"]):
            rec = {"key": key, "source": source, "references": [caption], "prediction": caption}
            records.append({**rec, "findings": judge_record(rec)})
    (run / "eval").mkdir()
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run, cfg


def test_quota_batches_take_each_spec_its_share(run_dir):
    _, cfg = run_dir
    batches = list(P.quota_batches(cfg, ["shards/demo/general-train-000.tar::1", "shards/demo/medical-train-000.tar::3"],
                                   5, limit=12))
    sources = [s for b in batches for s in b["source"]]
    keys = [k for b in batches for k in b["key"]]
    assert len(sources) == 12 and len(set(keys)) == 12
    assert sum(s == "demo-general" for s in sources) == 3


def test_probe_end_to_end_writes_probe_json(run_dir, capsys):
    from msmedcap.cli import main

    run, cfg = run_dir
    assert main(["probe", str(run), "--train-samples", "48", "--eval-samples", "24", "--batch-size", "16",
                 "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "**Linear probes" in text and "| field | train | test |" in text and "Where the LM looks" in text
    result = json.loads((run / "probe" / "probe.json").read_text())
    assert set(result) >= {"run", "export", "variant", "branches", "settings", "samples", "representations",
                           "probes", "caption", "attention", "ablation", "time"}
    assert result["branches"] == ["clip", "sam"] and result["export"].endswith("stage2/export")
    assert result["samples"]["train"]["n"] == 48 and result["samples"]["eval"]["n"] == 24
    assert result["samples"]["train"]["domain"] == {"general": 12, "medical": 36}  # the run's 1 : 3 training mix

    # probes: every field of both grammars, every branch x representation, with its counts and majority
    probes = result["probes"]
    assert {"background", "objects", "modality", "lesion_present"} <= set(probes)
    for f, p in probes.items():
        assert p["n_train"] > 0 and p["n_test"] > 0 and 0 <= p["majority"]["rate"] <= 1, f
        for b in ("clip", "sam"):
            assert set(p["results"][b]) == set(P.REPRESENTATIONS)
            assert all(0 <= r["accuracy"] <= 1 for r in p["results"][b].values())
    assert probes["objects"]["heads"] > 1 and probes["modality"]["heads"] == 1
    assert result["representations"]["sam"]["queries"]["dim"] == 16 * 64

    # the LM's attention: each layer's shares over the segments sum to 1, overall and per domain
    att = result["attention"]
    assert att["segments"] == ["soft_prompts", "clip_queries", "sam_queries", "prompt", "caption"]
    assert att["lengths"]["soft_prompts"] == 4 and att["lengths"]["clip_queries"] == 16
    assert len(att["layers"]) == cfg.model.lm.config["num_hidden_layers"]
    for layers in [att["layers"], *(d["layers"] for d in att["domain"].values())]:
        for layer in layers:
            assert sum(layer.values()) == pytest.approx(1.0, abs=1e-4)
            assert all(v >= 0 for v in layer.values())
    assert sum(att["mean"].values()) == pytest.approx(1.0, abs=1e-4)

    # leave one branch out: nothing, each branch, all; changes against nothing replaced
    runs = result["ablation"]["runs"]
    assert list(runs) == ["none", "clip", "sam", "all"] and runs["all"]["replaced"] == ["clip", "sam"]
    assert result["ablation"]["greedy"]["num_beams"] == 1
    for name in ("clip", "sam", "all"):
        assert runs[name]["delta_loss"] == pytest.approx(runs[name]["loss"] - runs["none"]["loss"])
        assert set(runs[name]["delta_fields"]) == set(runs["none"]["fields"])
    assert runs["none"]["loss"] > 0

    # the run's own captions (references as predictions here): right on every field they were scored on
    cap = result["caption"]
    assert cap["n"] == 8 and cap["path"].endswith("eval/predictions.jsonl")
    assert all(v["accuracy"] == 1.0 for v in cap["fields"].values() if v["n"])


def test_probe_restores_the_lm_attention_implementation(run_dir):
    from msmedcap.eval.checkpoints import load_for_eval

    run, _ = run_dir
    model, _ = load_for_eval(run / "stage2" / "export")
    before = model.captioner.lm.config._attn_implementation
    with P.eager_attention(model.captioner.lm) as lm:
        assert lm.config._attn_implementation == "eager"
    assert model.captioner.lm.config._attn_implementation == before


def test_probe_cli_errors(tmp_path, capsys):
    from msmedcap.cli import main

    assert main(["probe", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_counterfactual_probe_counts_each_sets_samples_and_writes_its_json(run_dir, capsys):
    """``msmedcap probe RUN --counterfactuals``: per term set of the run's config (the demo grammar's), the samples
    whose reference matches it, and the share preferring the reference by LM likelihood and each branch's ITC/ITM."""
    from msmedcap.cli import main
    from msmedcap.models.counterfactuals import Counterfactuals

    run, cfg = run_dir
    assert main(["probe", str(run), "--counterfactuals", "--train-samples", "32", "--eval-samples", "16",
                 "--batch-size", "8", "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| split | set | n | LM caption | clip ITC | clip ITM | sam ITC | sam ITM |" in text
    result = json.loads((run / "probe" / "counterfactuals.json").read_text())
    sets = cfg.model.stage1.counterfactuals.sets
    assert result["sets"] == list(sets) == ["margin", "side", "size", "count"]
    for split, specs, limit in (("train", cfg.data.train, 32), ("eval", cfg.data.eval, 16)):
        captions = [c for b in P.quota_batches(cfg, specs, 8, limit=limit) for c in b["caption"]]
        for name in sets:
            n = sum(bool(Counterfactuals(sets, [name]).sites(c)) for c in captions)
            got = result[split].get(name)
            assert (got["n"] if got else 0) == n, (split, name)
            if got:
                assert 0 <= got["lm"] <= 1
                assert all(0 <= v <= 1 for heads in got["branches"].values() for v in heads.values())
