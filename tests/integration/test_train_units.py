"""Trainer pieces without the launcher: DeepSpeed config filling, checkpoints on a real
single-process DeepSpeed engine, signals, metrics, launch-script arguments."""
import importlib.util
import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch

from msmedcap.config import ConfigError, load_config
from msmedcap.train.ds_config import fill_ds_config, read_ds_json

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return load_config("demo", ["train.stage1.steps=50", "train.stage1.grad_accum=2", "train.stage1.lr=2e-3",
                                "train.stage1.min_lr=2e-4", "train.stage1.warmup_lr=2e-5", "train.precision=auto"],
                       check_files=False)


def test_auto_values_filled_from_the_run_config(cfg):
    ds = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), cfg, 1, world_size=3)
    st = cfg.train.stage1
    assert ds["train_micro_batch_size_per_gpu"] == st.micro_batch_size
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == st.micro_batch_size * 2 * 3
    assert ds["gradient_clipping"] == st.grad_clip
    assert ds["optimizer"]["params"] == {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                         "weight_decay": st.weight_decay, "torch_adam": True}
    assert "scheduler" not in ds  # the trainer's warmup+cosine LambdaLR
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False  # CPU with native bf16
    no_bf16 = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), cfg, 1, 1, bf16_supported=False)
    assert not no_bf16["bf16"]["enabled"] and not no_bf16["fp16"]["enabled"]  # emulated bf16: fp32
    gpu = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), cfg, 1, 1, "cuda", bf16_supported=False)
    assert gpu["fp16"]["enabled"] and not gpu["bf16"]["enabled"]
    assert "auto" not in json.dumps(ds)
    # The stage-2 fill of the same JSON takes stage 2's values.
    ds2 = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2_offload.json"), cfg, 2, world_size=1)
    assert ds2["optimizer"]["params"]["lr"] == cfg.train.stage2.lr
    assert ds2["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # A JSON bringing DeepSpeed's own scheduler gets its "auto" values from the stage too.
    own = {"scheduler": {"type": "WarmupCosineLR", "params": {k: "auto" for k in (
        "total_num_steps", "warmup_num_steps", "warmup_min_ratio", "cos_min_ratio")}}}
    sp = fill_ds_config(own, cfg, 1, 1)["scheduler"]["params"]
    assert sp == {"total_num_steps": 50, "warmup_num_steps": st.warmup_steps, "warmup_min_ratio": pytest.approx(0.01),
                  "cos_min_ratio": pytest.approx(0.1)}


def test_warmup_then_cosine_to_min_lr(cfg):
    from msmedcap.train.schedule import lr_at

    st = cfg.train.stage1  # 50 steps, warmup 20 from 2e-5 to 2e-3, cosine to 2e-4
    lrs = [lr_at(i, st) for i in range(st.steps + 5)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[10] == pytest.approx((2e-5 + 2e-3) / 2)
    assert max(lrs) == lrs[20] == pytest.approx(2e-3)
    assert lrs[35] == pytest.approx((2e-3 + 2e-4) / 2) and lrs[50] == lrs[54] == pytest.approx(2e-4)
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21])) and all(a > b for a, b in zip(lrs[20:50], lrs[21:51]))


def test_contradicting_json_refused_naming_both_keys(cfg):
    ds = read_ds_json(REPO / "ds_configs/zero2.json")
    ds["optimizer"]["params"]["lr"] = 1e-4
    ds["train_batch_size"] = 7
    ds["gradient_accumulation_steps"] = 2  # agrees: no complaint
    with pytest.raises(ConfigError) as e:
        fill_ds_config(ds, cfg, 1, world_size=2, source="my.json")
    msg = str(e.value)
    assert "my.json" in msg and "optimizer.params.lr=0.0001 contradicts train.stage1.lr=0.002" in msg
    assert "train_batch_size=7" in msg and "gradient_accumulation_steps" not in msg
    # precision: explicit JSON bf16 with the config's auto is fine; with an explicit fp32 it contradicts
    ds = read_ds_json(REPO / "ds_configs/zero2.json")
    ds["bf16"]["enabled"] = True
    assert fill_ds_config(ds, cfg, 1, 1)["bf16"]["enabled"] is True
    fp32 = load_config("demo", ["train.precision=fp32"], check_files=False)
    with pytest.raises(ConfigError, match="bf16.enabled=True contradicts train.precision"):
        fill_ds_config(ds, fp32, 1, 1)
    fp16 = load_config("demo", ["train.precision=fp16"], check_files=False)
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), fp16, 1, 1)
    with pytest.raises(ConfigError, match="no run-config value to fill \"auto\" at zero_optimization.sub_group_size"):
        fill_ds_config({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, cfg, 1, 1)


def test_launch_script_arguments(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "launch/pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    a = pretrain.parse_args(["--deepspeed", "ds_configs/zero2_offload.json", "--config", "paper",
                             "train.stage=1", "--resume", "auto", "--local_rank=1"])
    assert a.ds_config == Path("ds_configs/zero2_offload.json") and a.config == "paper"
    assert a.overrides == ["train.stage=1"] and a.resume == "auto" and a.local_rank == 1
    a = pretrain.parse_args(["--deepspeed", "--deepspeed_config", "x.json", "train.seed=3"])
    assert a.ds_config == Path("x.json") and a.overrides == ["train.seed=3"]
    a = pretrain.parse_args(["--deepspeed", "train.seed=3"])
    assert a.ds_config == pretrain.DEFAULT_DS_CONFIG and a.overrides == ["train.seed=3"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert pretrain.main(["--deepspeed", str(bad)]) == 2  # fails before any work
    assert "bad.json: invalid JSON" in capsys.readouterr().err
    assert pretrain.main(["train.stage1.lr=oops"]) == 2
    assert "train.stage1.lr: expected a number" in capsys.readouterr().err


def test_stop_signal_recorded_not_fatal():
    from msmedcap.train.signals import StopRequest

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopRequest()
        assert not stop.agreed("cpu")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed("cpu") and stop.name == "SIGUSR1"
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_metrics_resume_drops_records_after_the_checkpoint(tmp_path):
    from msmedcap.train.metrics import MetricsLog, read_records

    log = MetricsLog(tmp_path)
    rec = dict(lr=1e-3, grad_norm=1.0, samples_per_s=1.0, tokens_per_s=1.0, flops_per_s=1.0,
               skipped_samples={"decode": 1}, overflow_skipped_steps=0, peak_memory_mb=1.0, elapsed_s=1.0)
    log.start_stage(1, 0, 4)
    for step in (1, 2, 3, 4):
        log.log({"step": step, "loss": 5.0 - step, "loss_itc": 1.0, **rec})
    log.start_stage(2, 0, 4)
    log.log({"step": 1, "loss": 3.0, **rec})
    log.start_stage(1, 2, 4)  # resumed stage 1 at step 2: later records (and stage 2) go
    log.log({"step": 3, "loss": 1.5, **rec})
    assert [(r["stage"], r["step"], r["loss"]) for r in read_records(tmp_path / "metrics.jsonl")] == \
        [(1, 1, 4.0), (1, 2, 3.0), (1, 3, 1.5)]
    assert log.close() == tmp_path / "loss.png" and (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.frozen(x)).pow(2).mean()


def test_checkpoints_atomic_rotating_trainable_only(tmp_path, monkeypatch):
    """A real one-rank DeepSpeed engine: keep-last-K, `latest`, no frozen weights, a stale
    half-written directory never picked up, and load restoring weights, optimizer, lr and RNG."""
    import deepspeed
    import torch.distributed as dist

    from msmedcap.train.checkpoint import CheckpointManager, DataPosition, TrainState, latest_checkpoint, set_rng_states

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    from msmedcap.train.schedule import warmup_cosine

    cfg = load_config("demo", ["train.stage1.steps=10", "train.stage1.warmup_steps=2", "train.stage1.micro_batch_size=4",
                               "train.precision=bf16"], check_files=False)
    ds = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), cfg, 1, 1)
    deepspeed.init_distributed("gloo")
    try:
        def engine():
            torch.manual_seed(0)
            model = Tiny()
            e, _, _, sched = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                                  if p.requires_grad], config=ds,
                                                  lr_scheduler=warmup_cosine(cfg.train.stage1))
            return e, sched

        e, sched = engine()
        root = tmp_path / "ckpt"
        exported = []
        mgr = CheckpointManager(root, keep_last=2, rank=0, barrier=dist.barrier, export=exported.append)
        x = torch.randn(4, 8, dtype=torch.bfloat16)
        position = DataPosition(seed=42, world_size=1, num_workers=2)
        for step in (1, 2, 3):
            e.backward(e(x))
            e.step()
            position.micro_batches += 2
            mgr.save(e, TrainState(1, step, position))
        assert sorted(p.name for p in root.iterdir() if p.suffix != ".py") == ["latest", "step00000002", "step00000003"]
        assert (root / "latest").read_text() == "step00000003" and len(exported) == 3
        states = torch.load(root / "step00000003/mp_rank_00_model_states.pt", weights_only=False)
        assert set(states["module"]) == {"head.weight", "head.bias"}  # the frozen layer is not in it
        assert states["stage"] == 1 and states["step"] == 3
        assert states["world_size"] == 1 and states["seed"] == 42
        assert json.loads((root / "step00000003/trainer_state.json").read_text()) == {
            "stage": 1, "step": 3, "world_size": 1, "seed": 42, "data": {"micro_batches": 6, "num_workers": 2}}
        # A kill mid-save leaves a dot-directory: never the latest, cleaned by the next save.
        (root / ".tmp-step00000004").mkdir()
        assert latest_checkpoint(root).name == "step00000003"
        rng_at_3 = torch.get_rng_state()
        expected = [e(x).item() for _ in range(1)]
        e.backward(e(x))
        e.step()
        lr_after_4 = sched.get_last_lr()[0]
        loss_after_4 = e(x).item()

        e2, sched2 = engine()  # fresh weights, as after a restart
        mgr2 = CheckpointManager(root, 2, 0, dist.barrier)
        # another world size, worker count or seed: refused, naming what differs, before anything is loaded
        from msmedcap.train.checkpoint import IncompatibleCheckpoint

        for other, what in ((DataPosition(42, 2, 2), "ranks (WORLD_SIZE) 1 then, 2 now"),
                            (DataPosition(42, 1, 4), "data.num_workers 2 then, 4 now"),
                            (DataPosition(7, 1, 2), "train.seed 42 then, 7 now")):
            with pytest.raises(IncompatibleCheckpoint, match=re.escape(what)):
                mgr2.load(e2, root / "step00000003", expect=other)
        state = mgr2.load(e2, root / "step00000003", expect=DataPosition(42, 1, 2))
        assert state.step == 3 and state.data.micro_batches == 6 and state.rng is not None
        set_rng_states(state.rng)
        assert [e2(x).item() for _ in range(1)] == expected
        assert torch.equal(torch.get_rng_state(), rng_at_3)
        e2.backward(e2(x))
        e2.step()
        assert sched2.get_last_lr()[0] == lr_after_4 and e2(x).item() == loss_after_4
    finally:
        dist.destroy_process_group()


def test_frozen_parts_stay_bit_identical_under_a_bf16_engine(monkeypatch):
    """DeepSpeed's bf16 engine casts every parameter of the module it wraps (deepspeed/runtime/engine.py,
    ``_cast_module_mixed_precision``); build_engine keeps the frozen encoders and LM out of its sight, so
    they keep their dtype and every bit of their values through initialize and a step; the trainables
    this stage does not train come back as they were; the stage's trainables are bf16."""
    import deepspeed
    import torch.distributed as dist

    from msmedcap.data.loader import make_train_loader
    from msmedcap.models import build_model
    from msmedcap.train.engine import build_engine
    from msmedcap.train.trainer import to_device
    from msmedcap.train.world import single_process_env

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so what single_process_env sets is undone after the test
        monkeypatch.delenv(k)
    single_process_env()
    cfg = load_config("demo", ["model.frozen_dtype=fp32", "train.precision=bf16", "data.num_workers=0",
                               "data.shuffle_buffer=1", "train.stage1.micro_batch_size=2"])
    ds = fill_ds_config(read_ds_json(REPO / "ds_configs/zero2.json"), cfg, 1, 1)
    deepspeed.init_distributed("gloo")
    try:
        model = build_model(cfg.model)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("encoders.", "captioner.lm."))}
        engine, _ = build_engine(model, cfg, 1, ds)
        out = engine(to_device(next(iter(make_train_loader(cfg, 1, 0, 1))), torch.device("cpu")))
        engine.backward(out["loss"])
        engine.step()
        assert torch.isfinite(out["loss"])
        after = dict(model.named_parameters())
        for name, value in frozen.items():
            assert after[name].dtype == torch.float32 and torch.equal(after[name], value), name
        # what stage 1 trains is bf16; the trainables it does not train (projections, soft prompts) keep fp32
        assert {p.dtype for _, p in model.stage_named_parameters(1)} == {torch.bfloat16}
        assert {p.dtype for n, p in model.trainable_named_parameters() if not model.stage_trains(n, 1)} == {torch.float32}
    finally:
        dist.destroy_process_group()


def test_checkpoint_interval_and_atomic_dir(tmp_path):
    """The interval rule (every ckpt_every steps, the last step, a stop) and the one atomic directory
    writer: the final name is absent until published, an earlier one replaced, a stale temp removed."""
    from msmedcap.train.checkpoint import AtomicDir, CheckpointManager

    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0, barrier=lambda: None, every=3)
    assert [s for s in range(1, 9) if mgr.due(s, 8)] == [3, 6, 8] and mgr.due(4, 8, stopping=True)
    target = AtomicDir(tmp_path / "export")
    (tmp_path / ".tmp-export").mkdir()
    (tmp_path / ".tmp-export/stale").write_text("from a killed writer")
    tmp = target.begin()
    assert tmp.name == ".tmp-export" and not tmp.exists()
    tmp.mkdir()
    (tmp / "a").write_text("1")
    assert not (tmp_path / "export").exists()
    target.publish()
    assert (tmp_path / "export/a").read_text() == "1" and not tmp.exists()
    AtomicDir(tmp_path / "export").begin().mkdir()
    (tmp_path / ".tmp-export/b").write_text("2")
    AtomicDir(tmp_path / "export").publish()
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or trash left


def test_loader_start_order_and_window_keeps_losses_on_device():
    """start_loader: refuses to fork workers without the stop handler, applies the RNG states after
    the loader started. Window: loss sums stay tensors until reduced; the reduced means are the
    float64 means of the micro-batch losses."""
    from msmedcap.train.checkpoint import rng_states
    from msmedcap.train.metrics import Window
    from msmedcap.train.signals import StopRequest
    from msmedcap.train.trainer import start_loader

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopRequest()
        torch.manual_seed(1)
        saved = rng_states()
        expected = torch.rand(1)
        drawn = []
        batches = start_loader(lambda: (drawn.append(torch.rand(1)), iter([1, 2]))[1], stop, saved)
        assert list(batches) == [1, 2] and torch.equal(torch.rand(1), expected)  # restored after the start drew
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with pytest.raises(RuntimeError, match="stop-signal handler"):
            start_loader(lambda: iter([]), stop, None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)

    w = Window()
    mask = torch.ones(2, 3, dtype=torch.long)
    values = [1.1, 2.2, 3.3]
    for v in values:
        w.add({"loss": torch.tensor(v), "itc": torch.tensor(v / 2), "vector": torch.ones(3)},
              {"key": ["a", "b"], "text_attention_mask": mask}, stage=1)
    assert isinstance(w.sums["loss"], torch.Tensor) and set(w.sums) == {"loss", "loss_itc"}
    host = w.host_sums()
    assert host["loss"] == sum(float(torch.tensor(v)) for v in values)  # as the per-micro-batch floats summed

    class OneRank:
        @staticmethod
        def get_world_size():
            return 1

        @staticmethod
        def all_gather_object(parts, obj):
            parts[0] = obj

    stats = w.reduce(OneRank)
    assert stats["loss"] == host["loss"] / 3 and stats["samples"] == 6 and stats["tokens"] == 18
    assert list(stats["losses"]) == ["loss", "loss_itc"]


def test_resume_with_another_worker_count_or_world_is_refused(tmp_path):
    """A checkpoint's data position is a function of the seed, world size and data.num_workers: a
    resume with another one is refused (exit 2) naming what differs, nothing trained or written."""
    import subprocess
    import sys

    out = tmp_path / "run"
    base = [sys.executable, "launch/pretrain.py", f"train.output_dir={out}", "train.stage=1", "train.stage1.steps=2",
            "train.stage1.micro_batch_size=2", "train.stage1.warmup_steps=0", "train.ckpt_every=1", "train.log_every=1",
            "data.shuffle_buffer=4", "train.eval_at_end=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MSMEDCAP_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    first = subprocess.run(base + ["data.num_workers=0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = out / "stage1/checkpoints/step00000001"
    assert json.loads((ckpt / "trainer_state.json").read_text())["data"] == {"micro_batches": 1, "num_workers": 0}
    again = subprocess.run(base + ["data.num_workers=1", "--resume", str(ckpt)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stderr[-3000:]
    assert "data.num_workers 0 then, 1 now" in again.stderr and "Resume with the same number of ranks" in again.stderr
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
