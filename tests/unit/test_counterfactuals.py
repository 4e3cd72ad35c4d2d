"""Counterfactual captions (msmedcap.models.counterfactuals): one finding changed per negative, never the
positive, seeded; and their use as ITM negatives in stage 1 (model.stage1.counterfactuals).

The captions below follow ROCO's released captions (Pelka et al., "Radiology Objects in COntext (ROCO)",
2018; github.com/razorx89/roco-dataset, ``data/*/radiology/captions.txt``: one free-text figure caption
per image, sentence case, with sides, counts, sizes and negations as radiologists write them)."""
import difflib

import pytest
import torch
from helpers.model_kit import CAPTIONS, demo_config, make_batch, one_thread

from msmedcap.config import ConfigError, load_config
from msmedcap.models import build_model
from msmedcap.models.counterfactuals import RADIOLOGY_SETS, Counterfactuals, normalise_sets
from msmedcap.models.stage1_settings import CounterfactualsConfig

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

ROCO_STYLE = [
    "Axial CT image showing a large hypodense lesion in the right lobe of the liver.",
    "Chest X-ray showing left-sided pleural effusion.",
    "Contrast-enhanced CT of the abdomen shows two small cystic lesions in the left kidney.",
    "MRI of the brain: T2-weighted image with a hyperintense lesion in the left frontal lobe.",
    "Chest radiograph with no evidence of pneumothorax.",
    "Ultrasound of the thyroid showing a well-defined hypoechoic nodule.",
    "Coronal CT showing three enlarged lymph nodes without calcification.",
    "Axial T1-weighted MRI showing a mass with irregular margins in the posterior fossa.",
    "There is no focal consolidation. The heart size is normal.",
    "Plain radiograph of the left knee showing a lateral tibial plateau fracture.",
    "CT angiography showing bilateral pulmonary emboli in the lower lobe arteries.",
    "Sagittal MRI of the lumbar spine showing mild disc bulging at L4-L5.",
]


def _one_span_changed(a: str, b: str) -> bool:
    """``b`` differs from ``a`` in one contiguous run of words."""
    wa, wb = a.split(), b.split()
    ops = [op for op in difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes() if op[0] != "equal"]
    return len(ops) == 1


def _swaps(caption: str, groups: list) -> set:
    """Every caption made by replacing one match of a term with another term of its group (brute force,
    lower case; ``*`` carries its word)."""
    import re

    from msmedcap.models.counterfactuals import term_pattern

    out = set()
    for group in groups:
        for a in group:
            for m in re.finditer(term_pattern(a), caption, re.IGNORECASE):
                for b in group:
                    if b != a:
                        words = iter(m.groups())
                        text = " ".join(next(words) if w == "*" else w for w in b.split())
                        out.add((caption[:m.start()] + text + caption[m.end():]).lower())
    return out


def test_each_roco_style_negative_changes_one_term_to_another_of_its_group():
    maker = Counterfactuals(RADIOLOGY_SETS)
    groups = [g for gs in normalise_sets(RADIOLOGY_SETS).values() for g in gs]
    g = torch.Generator().manual_seed(0)
    made = 0
    for caption in ROCO_STYLE:
        for _ in range(20):
            negative, name = maker.make(caption, g)
            assert negative is not None and name in RADIOLOGY_SETS, caption
            assert negative.lower() != caption.lower()  # never the positive
            # one term replaced by another of its group, in one place: one finding changed
            assert negative.lower() in _swaps(caption, groups), (caption, negative)
            assert _one_span_changed(caption, negative), (caption, negative)
            assert negative[0] == caption[0]  # sentence case kept
            made += 1
    assert made == 20 * len(ROCO_STYLE)


def test_a_caption_with_no_term_has_no_counterfactual():
    maker = Counterfactuals(RADIOLOGY_SETS)
    assert maker.make("Panoramic radiograph of the mandible.") == (None, None)
    assert maker.make("An abnormally shaped vertebra.") == (None, None)  # "normal" inside a word is no term


def test_longest_term_wins_within_a_set_and_slots_carry_words():
    maker = Counterfactuals({"negation": [["no evidence of", "evidence of"]],
                             "count": [["one * lesion", "two * lesions"]]})
    sites = maker.sites("There is no evidence of one small lesion.")
    assert [caption_span for caption_span in sites] == ["negation", "count"]
    assert len(sites["negation"]) == 1 and sites["negation"][0].term == 0  # not "evidence of" inside it
    (site,) = sites["count"]
    assert maker.apply("There is no evidence of one small lesion.", site, 1) == \
        "There is no evidence of two small lesions."


def test_the_same_seed_gives_the_same_negatives_and_another_seed_others():
    maker = Counterfactuals(RADIOLOGY_SETS)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [maker.make(c, g) for c in ROCO_STYLE * 3]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_every_set_is_drawn_where_a_caption_has_several():
    maker = Counterfactuals(RADIOLOGY_SETS)
    caption = "Chest X-ray showing two small nodules in the left lung with no evidence of effusion."
    g = torch.Generator().manual_seed(0)
    drawn = {maker.make(caption, g)[1] for _ in range(200)}
    assert drawn == {"side", "negation", "number", "size"}


@pytest.mark.parametrize("sets, use, message", [
    ({"margin": ["smooth"]}, [], "must be two or more distinct terms"),
    ({"margin": ["smooth", "Smooth"]}, [], "must be two or more distinct terms"),
    ({"count": ["* lesion", "*"]}, [], "must be more than"),
    ({"count": ["one * lesion", "two lesions"]}, [], "must be alike in their number"),
    ({"margin": ["smooth", "irregular"]}, ["shape"], "unknown set 'shape'"),
    ("margin", [], "expected a mapping"),
])
def test_bad_sets_are_refused_naming_the_key(sets, use, message):
    import json

    overrides = ["model.stage1.counterfactuals.enabled=true", f"model.stage1.counterfactuals.use={json.dumps(use)}",
                 f"model.stage1.counterfactuals.sets={json.dumps(sets)}"]  # JSON is YAML flow style
    with pytest.raises(ConfigError, match=message) as e:
        load_config("demo", overrides, check_files=False)
    assert "model.stage1.counterfactuals." in str(e.value)


# --------------------------------------------------------------------------- stage 1
def _capture_itm_texts(model, branch: str) -> list:
    seen = []
    q = model.qformers[branch]
    real = q.multimodal
    q.multimodal = lambda ids, mask, images: seen.append(ids.clone()) or real(ids, mask, images)
    return seen


def test_stage1_replaces_the_share_of_text_negatives_by_counterfactuals_and_counts_them(tokenizers):
    captions = CAPTIONS  # sides, sizes and descriptors of RADIOLOGY_SETS in some of them
    cfg = demo_config(tokenizers, "model.stage1.counterfactuals.enabled=true", "model.stage1.counterfactuals.sets=null",
                      "model.stage1.counterfactuals.itm_share=1.0")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = make_batch(cfg, captions=captions, domains=[1] * len(captions))  # all to the SAM branch
    seen = _capture_itm_texts(model, "sam")
    out = model.stage1_loss(batch, generator=torch.Generator().manual_seed(3))
    # the counterfactuals are drawn first from the generator given, caption by caption
    g = torch.Generator().manual_seed(3)
    expected = [Counterfactuals(RADIOLOGY_SETS).make(c, g) for c in captions]
    made = [(text, name) for text, name in expected if text is not None]
    assert float(out["n_cf"]) == len(made) >= 3
    for name in RADIOLOGY_SETS:
        assert float(out[f"n_cf/{name}"]) == sum(n == name for _, n in made)
    tok, n = model._qformer_tokenizer, len(captions)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    for (text, _), row, positive in zip(expected, seen[0][2 * n:], seen[0][:n]):
        if text is not None:  # share 1: the (image, other text) negative is the image's counterfactual
            assert decode(row) == decode(tok(text)["input_ids"]) != decode(positive)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_stage1_counterfactuals_off_draw_what_they_drew_before(tokenizers):
    """Off (the default; the demo preset turns them on): no counterfactual text, no count."""
    assert not CounterfactualsConfig().enabled
    cfg = demo_config(tokenizers, "model.stage1.counterfactuals.enabled=false")
    assert not cfg.model.stage1.negatives_skip_same_text
    torch.manual_seed(0)
    model = build_model(cfg.model)
    out = model.stage1_loss(make_batch(cfg), generator=torch.Generator().manual_seed(3))
    assert not any(k.startswith("n_cf") or "/n_cf" in k for k in out)


def test_mined_negatives_skip_samples_with_the_positives_caption(tokenizers):
    cfg = demo_config(tokenizers, "model.stage1.negatives_skip_same_text=true")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    # every caption twice: without the skip, a duplicate is the likeliest hard negative of some rows
    captions = CAPTIONS[:4] * 2
    batch = make_batch(cfg, captions=captions, domains=[0] * 8)
    seen = _capture_itm_texts(model, "clip")
    for seed in range(5):
        model.stage1_loss(batch, generator=torch.Generator().manual_seed(seed))
    for ids in seen:
        n = len(captions)
        positives, negatives = ids[:n], ids[2 * n:]
        assert not (positives == negatives).all(-1).any()


def test_loss_weights_scale_each_head_in_the_total_and_are_checked(tokenizers):
    cfg = demo_config(tokenizers, "model.stage1.loss_weights={itm: 3.0, itg: 0}")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    out = model.stage1_loss(make_batch(cfg), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out["loss"], out["itc"] + 3.0 * out["itm"], rtol=1e-5)  # itc from default 1
    with pytest.raises(ConfigError, match="model.stage1.loss_weights: unknown head 'itx'"):
        demo_config(tokenizers, "model.stage1.loss_weights={itx: 1}")
    with pytest.raises(ConfigError, match="model.stage1.loss_weights.itm must be a number >= 0"):
        demo_config(tokenizers, "model.stage1.loss_weights={itm: -1}")


# each caption names one side once: its counterfactual does not depend on the generator
SIDED = ["a chest x-ray showing a small nodule in the left lung", "mri of the brain showing a lesion in the right frontal lobe",
         "a chest x-ray showing a small nodule in the right lung", "mri of the brain showing a lesion in the left frontal lobe"]
SIDE_ONLY = ("model.stage1.counterfactuals.enabled=true", "model.stage1.counterfactuals.sets=null",
             "model.stage1.counterfactuals.use=[side]", "model.stage1.counterfactuals.itc=true",
             "model.stage1.negatives_skip_same_text=true")


def _two_rank_worker(rank, port, tokenizers, result):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = demo_config(tokenizers, *SIDE_ONLY)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    batch = make_batch(cfg, captions=SIDED, domains=[1, 1, 1, 1], seed=rank)
    out = model.stage1_loss(batch, generator=torch.Generator().manual_seed(rank))
    out["loss"].backward()  # every rank through the same collectives
    result[rank] = {"sam_itc": out["sam/itc"].item(), "n_cf": out["n_cf"].item()}
    dist.destroy_process_group()


def test_counterfactual_itc_column_across_two_ranks_is_the_one_batch_loss(tokenizers):
    """ITC with each image's own counterfactual as an extra column: two gloo ranks give the one-process
    loss of both batches (the column is the rank's own; the other columns are gathered)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.start_processes(_two_rank_worker, args=(port, tokenizers, result), nprocs=2, start_method="fork")
    cfg = demo_config(tokenizers, *SIDE_ONLY)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    b0, b1 = (make_batch(cfg, captions=SIDED, domains=[1, 1, 1, 1], seed=r) for r in (0, 1))
    both = {k: (v + b1[k] if isinstance(v, list) else torch.cat([v, b1[k]])) for k, v in b0.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = model.stage1_loss(both, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        plain = build_model(demo_config(tokenizers).model).eval()  # the same weights, no counterfactual column
        without = plain.stage1_loss(both, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    assert (result[0]["sam_itc"] + result[1]["sam_itc"]) / 2 == pytest.approx(out["sam/itc"].item(), abs=1e-3)
    assert abs(out["sam/itc"].item() - without["sam/itc"].item()) > 1e-3  # the column counts
    assert result[0]["n_cf"] + result[1]["n_cf"] <= 8
