"""The demo LM reads its context (issue 15): any fact in the prefix steers the caption.

The shipped stand-in for OPT (msmedcap/assets/opt-demo, rebuilt by ``msmedcap demo lm``)
gets, in the positions and numbers stage 2 uses (soft prompts + queries of one branch, of two), the
embeddings of a held-out caption's tokens, shuffled, with noise; greedy decoding must write that
caption. A tiny OPT trained on bare captions fails this (it reproduced 0 of the black backgrounds).
"""
import random

import pytest
import torch

from msmedcap.demo import lm as demo_lm

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("which", [0, 1], ids=["one-branch", "two-branch"])
def test_shipped_demo_lm_is_steered_by_its_prefix(which):
    k = demo_lm.prefix_lengths(demo_lm.demo_lm_config())[which]
    acc, misses = demo_lm.shipped_steer_accuracy(k)
    assert acc >= 0.95, (k, acc, misses[:5])


def test_prefix_changes_one_fact_changes_the_caption():
    """Swapping one word in the context (the background colour, the lesion side) swaps it in the caption."""
    from transformers import OPTForCausalLM

    from msmedcap.tokenization import load_lm_tokenizer

    cfg = demo_lm.demo_lm_config()
    tok = load_lm_tokenizer(cfg.lm.tokenizer)
    lm = OPTForCausalLM.from_pretrained(demo_lm.OUT)
    pairs = [("two red circles on a white background.", "two red circles on a black background."),
             ("chest x-ray showing one large nodule in the left lung with smooth margins.",
              "chest x-ray showing one large nodule in the right lung with smooth margins.")]
    for a, b in pairs:
        acc, misses = demo_lm.steer_accuracy(lm, tok, cfg.lm.prompt, [a, b], demo_lm.prefix_lengths(cfg)[0])
        assert acc == 1.0, misses


def test_hints_hold_every_token_with_its_place():
    rng = random.Random(0)
    hints = demo_lm.hint_ids([5, 7, 5, 9], 6, rng)
    assert len(hints) == 6 and set(hints) == {(5, 0), (7, 1), (5, 2), (9, 3)}
    with pytest.raises(ValueError, match="more than the prefix"):
        demo_lm.hint_ids(list(range(10)), 6, rng)


def test_pretraining_is_seeded(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    a = demo_lm.pretrain_demo_lm(tmp_path / "a", steps=3, batch_size=8, log_every=0)
    b = demo_lm.pretrain_demo_lm(tmp_path / "b", steps=3, batch_size=8, log_every=0)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
