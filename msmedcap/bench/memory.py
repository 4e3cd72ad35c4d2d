"""Part 5: peak memory per rank and optimizer state per trainable parameter, ZeRO-2 vs stage 0
(DDP-like: every rank keeps the whole optimizer state), on 2 ranks started by the deepspeed launcher.

``run_zero_comparison`` launches this module as the worker, once per ZeRO stage; each rank writes
``rank<N>.json``. Peak memory: ``torch.cuda.max_memory_allocated`` on GPUs, the process's peak
resident set (``ru_maxrss``, libraries included) on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from msmedcap.train.metrics import peak_memory_mb


def optimizer_state_bytes(engine, model) -> dict:
    """Bytes this rank's optimizer holds: Adam moments plus master weights (fp32 copies that are not
    the model's own parameters), whatever wrapper DeepSpeed put around the torch optimizer."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    own = {id(p) for p in model.parameters()}
    moments = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                  if isinstance(t, torch.Tensor) and t.dim() > 0)
    master = sum(p.numel() * p.element_size() for g in inner.param_groups for p in g["params"] if id(p) not in own)
    return {"moments": moments, "master_weights": master, "total": moments + master,
            "optimizer_class": f"{type(engine.optimizer).__name__}({type(inner).__name__})"}


def worker(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="demo")
    p.add_argument("--zero-stage", type=int, required=True)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from msmedcap.bench.common import bench_config, device, ds_engine, synthetic_batch, to_device
    from msmedcap.models import build_model
    from msmedcap.train.engine import StageLoss

    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dev = torch.device("cuda", torch.cuda.current_device())
    work = tempfile.TemporaryDirectory()  # stand-in tokenizers live here until the process ends
    cfg, _ = bench_config(args.preset, args.overrides, Path(work.name))
    batch = synthetic_batch(cfg, args.batch, seed=int(os.environ.get("RANK", 0)))
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    engine, ds = ds_engine(StageLoss(model, args.stage), model, cfg, args.stage, args.zero_stage, args.batch)
    inputs = to_device(batch, dev)
    for _ in range(args.steps):
        engine.backward(engine(inputs)["loss"])
        engine.step()
    rank = torch.distributed.get_rank()
    trainable = sum(p.numel() for _, p in model.trainable_named_parameters())
    state = optimizer_state_bytes(engine, model)
    result = {"rank": rank, "world_size": torch.distributed.get_world_size(), "zero_stage": args.zero_stage,
              "precision": "bf16" if ds.get("bf16", {}).get("enabled") else "fp32", "trainable_params": trainable,
              "optimizer_state_bytes": state, "optimizer_bytes_per_trainable_param": state["total"] / trainable,
              "peak_memory_mb": peak_memory_mb(dev),
              "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS (ru_maxrss)"}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_zero_comparison(preset: str, overrides: list, batch: int, steps: int, threads: int, ranks: int = 2,
                        timeout: int = 900) -> dict:
    """Launch ``ranks`` ranks per ZeRO stage (0 and 2); per-rank results and the per-stage summary."""
    out = {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    for zero in (0, 2):
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-c", "import sys; from deepspeed.launcher.runner import main; sys.exit(main())",
                   "--num_gpus", str(ranks), "--master_port", str(_free_port()), "--module", "msmedcap.bench.memory",
                   "--preset", preset, "--zero-stage", str(zero), "--batch", str(batch), "--steps", str(steps),
                   "--threads", str(threads), "--out", d, *overrides]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            files = sorted(Path(d).glob("rank*.json"))
            if proc.returncode or len(files) != ranks:
                raise RuntimeError(f"ZeRO-{zero} run on {ranks} ranks failed (exit {proc.returncode}):\n"
                                   + "\n".join((proc.stdout + proc.stderr).splitlines()[-25:]))
            rows = [json.loads(f.read_text()) for f in files]
        out[f"zero{zero}"] = {
            "ranks": rows, "peak_memory_mb_max": max(r["peak_memory_mb"] for r in rows),
            "optimizer_bytes_per_trainable_param": max(r["optimizer_bytes_per_trainable_param"] for r in rows)}
    z0, z2 = out["zero0"], out["zero2"]
    out["optimizer_state_ratio_zero2_vs_zero0"] = (z2["optimizer_bytes_per_trainable_param"]
                                                   / z0["optimizer_bytes_per_trainable_param"])
    return out


if __name__ == "__main__":
    sys.exit(worker())
