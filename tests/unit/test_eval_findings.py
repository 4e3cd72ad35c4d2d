"""Findings accuracy (msmedcap.eval.findings): the demo grammar's fields on hand-made reference /
prediction pairs (right, wrong, not stated), malformed predictions (wrong, never a crash),
unparseable references (counted, left out), per-domain/per-source aggregation, the lexicon's
P/R/F1 on ROCO-like free text, the parser registry; and that scores.json, predictions.jsonl,
gallery.html, the tables, `--compare` and `msmedcap score` carry the findings.

Pure Python except two Java runs (score_records: PTB tokenizer + METEOR), shared by a module fixture."""
import json
import tarfile
from pathlib import Path

import pytest

from msmedcap.eval import findings as F
from helpers.html import Collect

REPO = Path(__file__).resolve().parents[2]
CT = "axial ct of the abdomen showing two small lesions in the left kidney with irregular margins."
XR = "chest x-ray showing one large nodule in the right lung with smooth margins."
MR0 = "axial mr of the brain with no focal lesion."
GEN = "two red circles and one blue square on a white background."
LESION = ("count", "size", "side", "margin")


def judge(ref, pred, source="demo-ct"):
    return F.judge_record({"key": "k", "source": source, "references": [ref], "prediction": pred})


def fields(ref, pred, source="demo-ct"):
    return judge(ref, pred, source)["fields"]


def demo_eval_captions():
    out = []
    for domain in ("general", "medical"):
        with tarfile.open(REPO / "shards" / "demo" / f"{domain}-eval-000.tar") as t:
            names = {m.name: m for m in t.getmembers()}
            for name in sorted(names):
                if name.endswith(".json"):
                    meta = json.loads(t.extractfile(names[name]).read())
                    caption = t.extractfile(names[name[:-5] + ".txt"]).read().decode()
                    out.append((meta["source"], meta["domain"], caption))
    return out


# --------------------------------------------------------------------------- the demo grammar
def test_every_demo_caption_parses_and_scores_itself_perfectly():
    caps = demo_eval_captions()
    assert len(caps) == 300
    for source, domain, caption in caps:
        parser = F.parser_for({"source": source})
        assert parser is not None and parser.name == f"demo-{domain}", source
        strict = parser.strict(caption)
        assert strict is not None, caption
        assert parser.parse(caption) == strict, caption  # the lenient reading of a grammatical caption
        verdicts = fields(caption, caption, source)
        assert all(v in (True, None) for v in verdicts.values()) and any(verdicts.values()), (caption, verdicts)
    medical = [c for s, d, c in caps if d == "medical"]
    # every value of every field occurs in the eval set (the parser covers the grammar's vocabulary)
    values = {f: {str(F.parser_for({"source": "demo-ct"}).strict(c).get(f)) for c in medical}
              for f in ("modality", "lesion_present", "count", "size", "side", "margin")}
    assert values["modality"] == {"ct", "xray", "mr"} and values["count"] == {"None", "1", "2", "3"}
    assert values["side"] == {"None", "left", "right"} and values["margin"] == {"None", "smooth", "irregular"}


def test_medical_fields_right_wrong_and_not_stated():
    assert F.parser_for({"source": "demo-ct"}).strict(CT) == {
        "modality": "ct", "lesion_present": True, "count": 2, "size": "small", "side": "left", "margin": "irregular"}
    assert all(fields(CT, CT).values())
    # one field wrong at a time: only that field (and all four, for a lesion field) is wrong
    for wrong, field in (("chest x-ray showing two small nodules in the left lung with irregular margins.", "modality"),
                         (CT.replace("two", "three"), "count"), (CT.replace("small", "large"), "size"),
                         (CT.replace("left", "right"), "side"), (CT.replace("irregular", "smooth"), "margin")):
        v = fields(CT, wrong)
        assert v[field] is False, (wrong, v)
        assert all(v[f] for f in v if f not in (field, "lesion_all_four")), (wrong, v)
        assert v["lesion_all_four"] is (field == "modality")
    # a prediction of no lesion for a lesion: lesion wrong, the details it does not state wrong
    v = fields(CT, "axial ct of the abdomen with no focal lesion.")
    assert v["modality"] is True and v["lesion_present"] is False
    assert not any(v[f] for f in LESION) and v["lesion_all_four"] is False
    # reference without a lesion: the lesion fields are not scored, whatever the prediction says
    v = fields(MR0, "axial mr of the brain showing one small lesion in the left hemisphere with smooth margins.")
    assert v["modality"] is True and v["lesion_present"] is False
    assert all(v[f] is None for f in LESION + ("lesion_all_four",))
    assert fields(MR0, MR0) == {"modality": True, "lesion_present": True, **{f: None for f in LESION},
                                "lesion_all_four": None}
    # a wrong modality word in otherwise right grammar
    assert fields(XR, XR.replace("chest x-ray", "axial ct of the abdomen"))["modality"] is False


def test_general_fields_right_wrong_and_not_stated():
    g = "demo-general"
    assert F.parser_for({"source": g}).strict(GEN) == {
        "background": "white", "objects": [[1, "blue", "square"], [2, "red", "circle"]]}
    assert fields(GEN, GEN, g) == {"background": True, "objects": True}
    # the groups in another order are the same objects
    assert fields(GEN, "one blue square and two red circles on a white background.", g)["objects"] is True
    assert fields(GEN, GEN.replace("white", "black"), g) == {"background": False, "objects": True}
    for wrong in ("two red circles on a white background.",                                # a group missing
                  "two red circles and one blue square and one green triangle on a white background.",  # extra
                  "three red circles and one blue square on a white background.",          # a count
                  "two red circles and one blue circle on a white background."):           # a shape
        assert fields(GEN, wrong, g) == {"background": True, "objects": False}, wrong
    assert fields(GEN, "two red circles and one blue square.", g) == {"background": False, "objects": True}
    assert fields(GEN, "on a white background.", g) == {"background": True, "objects": False}


@pytest.mark.parametrize("pred", [
    "", "   ", "axial", "axial ct of the abdomen showing", "zzz ### \x00 \u2028 ..",
    "two red circles on a white background.",                  # the other domain's grammar
    "lesion lesion lesion left right smooth irregular ct mr",  # every value at once: states none of them
    "the the the the the the the the the the the the the the", "\u00e9\u00e8 \U0001F600 ct?",
])
def test_malformed_predictions_are_wrong_never_a_crash(pred):
    v = fields(CT, pred)
    assert set(v) == set(F.parser_for({"source": "demo-ct"}).fields)
    assert v["lesion_all_four"] is False and not any(v[f] for f in LESION)
    assert v["lesion_present"] is False or pred == "lesion lesion lesion left right smooth irregular ct mr"
    assert judge(CT, pred)["prediction_parsed"] is False
    g = fields(GEN, pred, "demo-general")
    assert g["objects"] is False


def test_truncated_and_conflicting_predictions_get_what_they_state():
    v = fields(CT, "axial ct of the abdomen showing two small")  # cut off: side and margin never said
    assert (v["modality"], v["lesion_present"], v["count"], v["size"]) == (True, True, True, True)
    assert (v["side"], v["margin"], v["lesion_all_four"]) == (False, False, False)
    v = fields(CT, "axial ct of the abdomen showing two small lesions in the left and right kidney with irregular margins.")
    assert v["side"] is False and v["count"] is True  # both sides named: the side is not stated
    # not a string (a broken predictions file): wrong everywhere, no exception
    assert not any(judge(CT, None)["fields"].values()) and not any(judge(CT, 17)["fields"].values())
    # case and whitespace do not matter; the missing full stop only makes it unparsed
    j = judge(CT, "  Axial CT of the abdomen showing TWO small lesions in the left   kidney with irregular margins")
    assert all(j["fields"].values()) and j["prediction_parsed"] is False


def test_unparseable_references_are_counted_and_left_out():
    recs = [{"key": "a", "source": "demo-ct", "domain": "medical", "references": [CT], "prediction": CT},
            {"key": "b", "source": "demo-ct", "domain": "medical", "references": ["a ct of something odd."],
             "prediction": CT},
            {"key": "c", "source": "demo-ct", "domain": "medical", "references": ["garbage", XR], "prediction": XR}]
    out = F.score_findings(recs)
    b = out["overall"]
    assert b["unparsed_references"] == 1 and b["n"] == 3
    assert b["fields"]["modality"] == {"accuracy": 1.0, "correct": 2, "n": 2}  # b left out, c judged on XR
    assert out["per_sample"]["b"]["reference_parsed"] is False
    assert all(v is None for v in out["per_sample"]["b"]["fields"].values())
    assert F.score_findings(recs[1:2])["overall"]["fields"]["modality"] == {"accuracy": None, "correct": 0, "n": 0}


def records_for_aggregation():
    """Hand-made records over three sources and both domains, with known per-field counts."""
    R = []

    def add(source, domain, ref, pred):
        R.append({"key": f"r{len(R):02d}", "source": source, "domain": domain, "references": [ref], "prediction": pred})

    add("demo-ct", "medical", CT, CT)                                    # all right
    add("demo-ct", "medical", CT, CT.replace("left", "right"))           # side wrong
    add("demo-ct", "medical", CT, "")                                     # empty
    add("demo-mr", "medical", MR0, MR0)                                   # no lesion, right
    add("demo-mr", "medical", MR0, CT)                                    # modality and lesion wrong
    add("demo-general", "general", GEN, GEN)
    add("demo-general", "general", GEN, GEN.replace("white", "grey"))
    add("demo-general", "general", "one green triangle on a black background.", GEN)
    add("roco", "medical", "Axial CT scan of the chest showing a mass in the left lower lobe (arrow).",
        "axial ct of the chest showing a mass in the right lung.")
    return R


def test_aggregation_overall_per_domain_per_source():
    from msmedcap.eval.scoring import group_keys

    recs = records_for_aggregation()
    out = F.score_findings(recs, group_keys(recs))
    o = out["overall"]
    assert o["n"] == 9 and o["parsers"] == {"demo-general": 3, "demo-medical": 5, "lexicon": 1}
    acc = {f: (s["correct"], s["n"]) for f, s in o["fields"].items()}
    assert acc == {"background": (1, 3), "objects": (2, 3), "modality": (3, 5), "lesion_present": (3, 5),
                   "count": (2, 3), "size": (2, 3), "side": (1, 3), "margin": (2, 3), "lesion_all_four": (1, 3)}
    assert list(o["fields"]) == F.registered_fields()  # table order
    assert o["fields"]["side"]["accuracy"] == pytest.approx(1 / 3)
    assert o["distinct_predictions"] == {"count": 7, "share": pytest.approx(7 / 9)}
    assert o["unparsed_predictions"] == 1  # the empty one (roco's free text goes to the lexicon)
    med = out["domain"]["medical"]
    assert med["n"] == 6 and "background" not in med["fields"] and med["lexicon"]["n"] == 1
    assert out["domain"]["general"]["fields"]["objects"]["n"] == 3 and "modality" not in out["domain"]["general"]["fields"]
    ct, mr = out["source"]["demo-ct"], out["source"]["demo-mr"]
    assert (ct["fields"]["side"]["correct"], ct["fields"]["side"]["n"]) == (1, 3)
    assert mr["fields"]["count"] == {"accuracy": None, "correct": 0, "n": 0}  # no lesion in any mr reference
    assert mr["fields"]["modality"]["accuracy"] == 0.5
    assert ct["distinct_predictions"]["share"] == 1.0 and set(out["source"]) == {"demo-ct", "demo-mr", "demo-general", "roco"}
    lex = out["source"]["roco"]["lexicon"]
    assert (lex["modality"]["tp"], lex["modality"]["fp"], lex["modality"]["fn"]) == (1, 0, 0)
    assert (lex["laterality"]["tp"], lex["laterality"]["fp"], lex["laterality"]["fn"]) == (0, 1, 1)
    assert lex["laterality"]["f1"] == 0.0 and lex["modality"]["f1"] == 1.0
    assert out["source"]["roco"]["fields"] == {}


def test_lexicon_precision_recall_f1_on_free_text():
    roco = [
        ("Axial CT scan of the chest showing a mass in the left lower lobe (arrow).",
         "axial ct scan of the chest showing a mass in the left lung."),                # ct, left: both right
        ("Contrast-enhanced T2-weighted MRI of the brain showing bilateral lesions.",
         "ct of the brain showing a lesion."),                                          # ct wrong; mri, bilateral missed
        ("Chest radiograph showing right pleural effusion.",
         "chest x-ray showing a right sided effusion and left atelectasis."),            # x-ray right; right ok, left extra
        ("Ultrasound of the liver.", "abdominal sonography showing a hypoechoic mass."),  # ultrasound both ways
        ("PET/CT showing uptake in the mediastinum.", "ct showing a mediastinal mass."),  # pet missed
        ("Photograph of the specimen.", "photograph of a specimen."),                    # no terms at all
    ]
    assert F.lexicon_terms(roco[1][0]) == {"modality": ["mri"], "laterality": ["bilateral"]}
    assert F.lexicon_terms(roco[4][0])["modality"] == ["ct", "pet"]
    assert F.lexicon_terms("Digital subtraction angiography; CTA; MRA of the circle of Willis")["modality"] == \
        ["angiography", "ct", "mri"]
    recs = [{"key": f"m{i}", "source": "roco", "domain": "medical", "references": [r], "prediction": p}
            for i, (r, p) in enumerate(roco)]
    lex = F.score_findings(recs)["overall"]["lexicon"]
    assert lex["n"] == 6
    # modality: tp ct, x-ray, ultrasound, ct = 4; fp ct (#1) = 1; fn mri (#1), pet (#4) = 2
    assert (lex["modality"]["tp"], lex["modality"]["fp"], lex["modality"]["fn"]) == (4, 1, 2)
    assert lex["modality"]["precision"] == pytest.approx(4 / 5) and lex["modality"]["recall"] == pytest.approx(4 / 6)
    assert lex["modality"]["f1"] == pytest.approx(2 * 0.8 * (2 / 3) / (0.8 + 2 / 3))
    # laterality: tp left (#0), right (#2) = 2; fp left (#2) = 1; fn bilateral (#1) = 1
    assert (lex["laterality"]["tp"], lex["laterality"]["fp"], lex["laterality"]["fn"]) == (2, 1, 1)
    assert lex["laterality"]["f1"] == pytest.approx(2 / 3)
    # several references: their terms are pooled
    j = F.judge_record({"key": "x", "source": "medicat", "references": ["CT of the left knee", "right knee MRI"],
                        "prediction": "mri"})
    assert j["lexicon"]["modality"] == {"reference": ["ct", "mri"], "prediction": ["mri"]}
    assert j["lexicon"]["laterality"]["reference"] == ["left", "right"]
    # nothing mentioned anywhere: precision and recall undefined (None), not 0
    none = F.score_findings(recs[5:])["overall"]["lexicon"]["modality"]
    assert none["precision"] is None and none["recall"] is None and none["f1"] is None


def test_registering_a_parser_for_another_source():
    class Yes(F.FindingsParser):
        name, fields = "yesno", ("answer",)

        def strict(self, text):
            t = F.normalize(text)
            return {"answer": t} if t in ("yes", "no") else None

        def parse(self, text):
            return self.strict(text) or {}

    parser = F.register_parser(Yes(), sources=("vqa-test",), predicate=lambda r: str(r.get("source")).startswith("vqa-"))
    try:
        assert F.parser_for({"source": "vqa-test"}) is parser and F.parser_for({"source": "vqa-other"}) is parser
        assert F.parser_for({"source": "roco"}) is None
        recs = [{"key": "a", "source": "vqa-test", "references": ["Yes"], "prediction": "yes"},
                {"key": "b", "source": "vqa-other", "references": ["no"], "prediction": "maybe"}]
        o = F.score_findings(recs)["overall"]
        assert o["fields"]["answer"] == {"accuracy": 0.5, "correct": 1, "n": 2} and o["unparsed_predictions"] == 1
        assert "answer" in F.registered_fields()
    finally:
        F._BY_SOURCE.pop("vqa-test")
        F._BY_PREDICATE.remove(next(x for x in F._BY_PREDICATE if x[1] is parser))


# --------------------------------------------------------------------------- the outputs
@pytest.fixture(scope="module")
def scored():
    from msmedcap.eval.scoring import score_records

    recs = records_for_aggregation()
    return recs, score_records(recs, spice="off")


def test_score_records_has_a_findings_block_per_subset(scored):
    recs, scores = scored
    subsets = [scores["overall"]] + [s for g in ("domain", "source") for s in scores[g].values()]
    assert len(subsets) == 1 + 2 + 4
    for s in subsets:
        f = s["findings"]
        assert set(f) == {"n", "distinct_predictions", "fields", "unparsed_references", "unparsed_predictions",
                          "parsers", "lexicon"}
        assert f["n"] == s["n"] and set(f["lexicon"]) == {"n", "modality", "laterality"}
        assert all(set(v) == {"accuracy", "correct", "n"} for v in f["fields"].values())
    assert scores["overall"]["findings"]["fields"]["side"]["correct"] == 1
    assert set(scores["per_sample_findings"]) == {r["key"] for r in recs}
    json.dumps(scores)  # all of it JSON


def test_gallery_marks_fields_and_filters_by_them(scored):
    from msmedcap.eval.gallery import render_gallery

    recs, scores = scored
    gallery_recs = [{**r, "scores": scores["per_sample"][r["key"]], "findings": scores["per_sample_findings"][r["key"]]}
                    for r in recs]
    page = render_gallery(gallery_recs, title="t", scores=scores)
    p = Collect()  # the gallery tests' parser: rows, options, balanced tags
    p.feed(page)
    p.close()
    assert not p.stack
    rows = {r["data-key"]: r for r in p.rows}
    assert rows["r00"]["data-wrong"] == "" and "side" in rows["r00"]["data-right"].split()
    assert rows["r01"]["data-wrong"].split() == ["side", "lesion_all_four"]
    assert float(rows["r01"]["data-findings"]) == pytest.approx(5 / 7)
    assert rows["r06"]["data-wrong"] == "background" and rows["r06"]["data-domain"] == "general"
    assert rows["r08"]["data-wrong"] == "laterality" and rows["r08"]["data-right"] == "modality"  # lexicon
    assert "findings" in p.options and "wrong:side" in p.options and "right:background" in p.options
    assert "anywrong:" in p.options and "cider" in p.options  # the old sort keys are still there
    assert "\u2717 side" in page and "laterality: ref left · pred right" in page
    assert 'id="findings"' in page and "all four" in page.split('id="findings"')[1].split("</table>")[0]


def test_tables_compare_and_score_cli_carry_findings(scored, tmp_path, capsys):
    from rich.console import Console

    from msmedcap.cli import main as msmedcap_main
    from msmedcap.eval import report

    recs, scores = scored
    console = Console(record=True, width=250)
    report.print_scores(scores, console=console)
    text = console.export_text()
    assert "Findings" in text and "all four" in text and "0.333" in text
    assert "Lexicon" in text and "mod P" in text and "lat F1" in text
    for variant, side in (("blip2", 1), ("msmedcap", 3)):
        run = tmp_path / variant / "eval"
        run.mkdir(parents=True)
        s = json.loads(json.dumps({k: v for k, v in scores.items() if not k.startswith("per_sample")}))
        s["overall"]["findings"]["fields"]["side"] = {"accuracy": side / 3, "correct": side, "n": 3}
        s["config"] = {"model": {"variant": variant}}
        (run / "scores.json").write_text(json.dumps(s))
    runs = [str(tmp_path / "blip2"), str(tmp_path / "msmedcap")]
    md = report.compare_markdown(runs)
    head = md.split("**domain: general**")[0]
    assert "*all · findings*" in head and "| model | n | background | objects | modality | lesion |" in head
    assert "| msmedcap | 9 |" in head and "**1.000**" in head.split("| msmedcap | 9 |")[-1]
    assert "*domain: medical · findings*" in md and "*source: roco · findings*" in md
    console = Console(record=True, width=250)
    report.print_compare(runs, console=console)
    assert "all · findings" in console.export_text()
    # a scores.json from before the findings: the comparison still works, without those tables
    old = json.loads((tmp_path / "blip2" / "eval" / "scores.json").read_text())
    for s in [old["overall"], *old["domain"].values(), *old["source"].values()]:
        s.pop("findings")
    (tmp_path / "old" / "eval").mkdir(parents=True)
    (tmp_path / "old" / "eval" / "scores.json").write_text(json.dumps(old))
    assert report.findings_table(old) is None
    md = report.compare_markdown([str(tmp_path / "old"), runs[1]])
    assert "| blip2 | 9 | " in md and "| blip2 | 0 | - |" in md  # its n-gram row; no findings: dashes

    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "rescored.json"
    assert msmedcap_main(["score", str(pred), "--out", str(out), "--spice", "off"]) == 0
    written = json.loads(out.read_text())
    assert written["overall"]["findings"] == json.loads(json.dumps(scores["overall"]["findings"]))
    assert "per_sample_findings" not in written and "all four" in capsys.readouterr().out


def test_evaluate_writes_findings_to_every_output(tmp_path, capsys):
    """The fused job with a stand-in model (it answers the reference, or garbage every third sample)
    on 12 demo eval samples: scores.json, predictions.jsonl and gallery.html carry the findings."""
    import torch

    from msmedcap.config import load_config
    from msmedcap.eval.evaluate import evaluate

    class Parrot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.i = 0

        def generate(self, batch, **kw):
            out = []
            for c in batch["caption"]:
                self.i += 1
                out.append("grey grey background lesion" if self.i % 3 == 0 else c)
            return out

    cfg = load_config("demo", ["data.num_workers=0", "eval.max_samples=12", "eval.batch_size=6"])
    scores = evaluate(Parrot(), cfg, tmp_path / "eval")
    written = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert written["overall"]["findings"]["n"] == 12 and "per_sample_findings" not in written
    assert written["overall"]["findings"]["distinct_predictions"]["count"] <= 12
    assert all("findings" in s for s in written["domain"].values())
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["findings"]["parser"].startswith("demo-") for p in preds)
    parrots = [p for p in preds if p["prediction"] == p["references"][0]]
    assert parrots and all(all(v is not False for v in p["findings"]["fields"].values()) for p in parrots)
    page = (tmp_path / "eval" / "gallery.html").read_text()
    assert 'value="wrong:' in page and 'id="findings"' in page
    assert "Findings" in capsys.readouterr().out
    assert scores["overall"]["findings"] == written["overall"]["findings"]
