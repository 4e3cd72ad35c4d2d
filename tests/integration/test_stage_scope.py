"""A stage-scoped optimizer (issue 13, item 5): each stage's optimizer holds only what the stage trains.

The model keeps one set of trainables (exported, loaded, hashed in every stage); ``set_stage`` (done by
``StageLoss``) freezes the others for the stage, so no AdamW weight decay shrinks them and they hold no
optimizer state. The name rule (``MSMedCap.stage_trains``) is checked against autograd: which
trainables get a gradient from the stage's loss on a real batch, without the zero "touch".
"""
import copy
from pathlib import Path

import pytest
import torch
from helpers.model_kit import demo_config, make_batch, one_thread, tokenizer_dirs

from msmedcap.config import load_config
from msmedcap.models import build_model, save_trainable
from msmedcap.train.ds_config import fill_ds_config, read_ds_json
from msmedcap.train.trainer import StageLoss, param_groups, weights_digest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return demo_config(tokenizer_dirs(tmp_path_factory))  # msmedcap variant: both branches, 4 soft prompts


def reached(model, loss) -> set:
    """Names of the trainables that get a gradient (not None) from ``loss``."""
    named = model.trainable_named_parameters()
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n for (n, _), g in zip(named, grads) if g is not None}


@pytest.mark.parametrize("stage,adapter", [(1, False), (2, False), (1, True), (2, True)])
def test_the_stage_name_rule_is_what_the_stage_loss_reaches(cfg, stage, adapter, monkeypatch):
    torch.manual_seed(0)
    if adapter:  # the SAM branch's token adapter: trained by both stages, like ln_vision
        cfg = copy.deepcopy(cfg)
        cfg.model.sam.token_mlp = 2
    model = build_model(cfg.model)
    if adapter:  # away from its identity start, so the adapter's first layer is reached too
        torch.nn.init.normal_(model.qformers["sam"].adapter.mlp[2].weight, std=0.1)
    model.set_stage(None)  # every trainable requires grad: autograd decides what is reached
    monkeypatch.setattr(model, "_touch_trainables", lambda: torch.zeros(()))
    batch = make_batch(cfg, domains=[0, 1, 0, 1, 1, 0, 1, 0])  # both branches get samples in stage 1
    loss = model.stage1_loss(batch)["loss"] if stage == 1 else model.stage2_loss(batch)["loss"]
    names = {n for n, _ in model.trainable_named_parameters()}
    rule = {n for n, _ in model.stage_named_parameters(stage)}
    assert reached(model, loss) == rule
    if stage == 1:
        assert rule == {n for n in names if n.startswith("qformers.")}  # the Q-Formers, heads included
    else:
        assert {"captioner.soft_prompts", "captioner.projections.sam.weight", "qformers.clip.query_tokens",
                "qformers.sam.ln_vision.weight", "qformers.clip.bert.encoder.layer.1.crossattention.attention.key.weight",
                "qformers.clip.bert.encoder.layer.0.output_query.dense.weight"} <= rule
        if adapter:
            assert {"qformers.sam.adapter.mlp.0.weight", "qformers.sam.adapter.mlp.2.bias"} <= rule
        assert not rule & {"qformers.clip.vision_proj.weight", "qformers.sam.itm_head.weight", "qformers.clip.temp",
                           "qformers.clip.embeddings.word_embeddings.weight", "qformers.sam.itg_bias",
                           "qformers.clip.bert.encoder.layer.0.intermediate.dense.weight"}
    assert len(rule) < len(names)


def test_set_stage_freezes_for_the_stage_only_and_the_touch_keeps_every_trained_grad(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    everything = [n for n, _ in model.trainable_named_parameters()]
    counts = model.parameter_counts()
    StageLoss(model, 2)
    assert [n for n, _ in model.trainable_named_parameters()] == everything  # still the model's trainables
    assert model.parameter_counts() == counts
    trained = {n for n, _ in model.stage_named_parameters(2)}
    assert {n for n, p in model.trainable_named_parameters() if p.requires_grad} == trained
    model.stage2_loss(make_batch(cfg))["loss"].backward()
    for n, p in model.trainable_named_parameters():
        assert (p.grad is not None) == (n in trained), n  # every trained one has a gradient; the others none
    model.set_stage(None)
    assert all(p.requires_grad for _, p in model.trainable_named_parameters())
    model.captioner.soft_prompts.requires_grad_(False)
    assert param_groups(model, 0.05, 1)  # stage 1 does not train it
    with pytest.raises(RuntimeError, match="StageLoss"):  # stage 2 does: the model is not scoped to stage 2
        param_groups(model, 0.05, 2)


def _engine(model, cfg, stage: int):
    import deepspeed

    st = getattr(cfg.train, f"stage{stage}")
    st.micro_batch_size, st.grad_accum, st.warmup_steps, st.lr = 8, 1, 0, 1e-2
    st.weight_decay = 0.5  # large: decoupled decay on a parameter would show at once
    ds = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), cfg, stage, 1)
    loss = StageLoss(model, stage)
    with model.without_frozen_parts():
        engine, *_ = deepspeed.initialize(model=loss, config=ds, model_parameters=param_groups(model, st.weight_decay))
    model.restore_held()
    return engine


def test_a_stage_leaves_what_it_does_not_train_bit_identical_under_a_bf16_zero2_engine(cfg, tmp_path, monkeypatch):
    """Stage 1 (bf16, ZeRO-2, weight decay 0.5): the projections and soft prompts, which only stage 2
    uses, come out bit-identical and fp32; stage 2: the ITC/ITM/ITG heads and the text side too. Both
    are still exported and hashed."""
    import deepspeed
    import torch.distributed as dist

    from msmedcap.train.world import single_process_env

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    single_process_env()
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = "bf16"
    deepspeed.init_distributed("gloo")
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model)
        before = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
        for stage in (1, 2):
            if stage == 2:  # as the trainer: a fresh model from stage 1's export
                save_trainable(model, tmp_path / "stage1", cfg)
                model = build_model(cfg.model, init_trainables=False)
                model.load_trainable(tmp_path / "stage1", strict=True)
            start = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
            engine = _engine(model, cfg, stage)
            trained = {n for n, _ in model.stage_named_parameters(stage)}
            inner = engine.optimizer.optimizer  # ZeRO-2's flat fp32 partitions: the stage's parameters only
            held = sum(p.numel() for g in inner.param_groups for p in g["params"])
            need = sum(p.numel() for _, p in model.stage_named_parameters(stage))
            assert need <= held < need + 64 * len(inner.param_groups)
            for i in range(3):
                out = engine(make_batch(cfg, seed=i, domains=[0, 1] * 4))
                engine.backward(out["loss"])
                engine.step()
            for n, p in model.trainable_named_parameters():
                if n in trained:
                    assert p.dtype == torch.bfloat16
                else:
                    assert p.dtype == torch.float32 and torch.equal(p, start[n]), n
            changed = [n for n in trained if not torch.equal(dict(model.named_parameters())[n].float(), start[n])]
            assert len(changed) > len(trained) // 2
            engine.destroy()
        proj = "captioner.projections.clip.weight"
        assert not torch.equal(dict(model.named_parameters())[proj].float(), before[proj])  # stage 2 trained it
        save_trainable(model, tmp_path / "export", cfg)
        again = build_model(cfg.model, init_trainables=False)
        again.load_trainable(tmp_path / "export", strict=True)  # every trainable, frozen-for-a-stage ones too
        assert weights_digest(again) == weights_digest(model)
        head = "qformers.clip.itm_head.weight"  # trained in stage 1 only: exported after stage 2 as stage 1 left it
        assert torch.equal(dict(again.named_parameters())[head], dict(model.named_parameters())[head])
        assert not torch.equal(dict(again.named_parameters())[head], before[head])
    finally:
        model.set_stage(None)
        dist.destroy_process_group()


def test_the_shipped_demo_config_scopes_stage_1(monkeypatch):
    """The demo preset as shipped (its pre-trained assets): stage 1's groups leave out the captioner."""
    cfg = load_config("demo", ["model.frozen_dtype=fp32"])
    model = build_model(cfg.model)
    StageLoss(model, 1)
    groups = param_groups(model, 0.05)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for n, p in model.trainable_named_parameters() if n.startswith("qformers.")}
    assert id(model.captioner.soft_prompts) not in ids
