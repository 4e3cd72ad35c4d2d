"""train.activation_checkpointing: the Q-Formers' and the LM's transformers layers recompute their
activations in the backward (torch.utils.checkpoint, non-reentrant). The gradients are those of the
plain model (ITG's path through the query keys/values that the query pass hands out included), and
far fewer activation bytes are kept for the backward."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from msmedcap.config import load_config
from msmedcap.data.loader import make_train_loader
from msmedcap.models import build_model

pytestmark = pytest.mark.slow


def _grads_and_saved_bytes(model, stage: int, batch: dict) -> tuple:
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout: the same masks in both runs (checkpoint replays the RNG state)
    with saved_tensors_hooks(pack, lambda t: t):
        loss = getattr(model, f"stage{stage}_loss")(batch)["loss"]
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


def test_checkpointed_layers_give_the_same_gradients_and_keep_less():
    cfg = load_config("demo", ["model.frozen_dtype=fp32", "data.num_workers=0", "data.shuffle_buffer=1",
                               "train.stage1.micro_batch_size=4", "train.stage2.micro_batch_size=4"])
    for stage in (1, 2):
        batch = next(iter(make_train_loader(cfg, stage, 0, 1)))
        torch.manual_seed(1)
        plain = build_model(cfg.model)
        plain.train()
        plain.set_stage(stage)
        torch.manual_seed(1)
        checkpointed = build_model(cfg.model)
        checkpointed.train()
        checkpointed.set_stage(stage)
        layers = checkpointed.checkpoint_activations()
        assert layers == 2 * cfg.model.qformer.num_layers + cfg.model.lm.config["num_hidden_layers"]
        expected, kept = _grads_and_saved_bytes(plain, stage, batch)
        got, kept_checkpointed = _grads_and_saved_bytes(checkpointed, stage, batch)
        assert got.keys() == expected.keys() and len(got) > 10
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
        if stage == 1:  # ITG's gradient reaches the query path's self-attention keys/values
            assert any("attention.attention.key" in n for n in got)
        assert kept_checkpointed < 0.6 * kept, (stage, kept_checkpointed, kept)
