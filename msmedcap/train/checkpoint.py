"""Atomic, rotating DeepSpeed checkpoints that resume bit-exactly.

Layout of one stage's checkpoint root::

    checkpoints/
      step00000200/                      complete checkpoint (a directory name without a dot)
        mp_rank_00_model_states.pt       DeepSpeed: trainable weights only (exclude_frozen_parameters)
        *_zero_pp_rank_*_optim_states.pt DeepSpeed: each rank's ZeRO-2 optimizer partition
        rng_rank0000.pt ...              each rank's python/numpy/torch RNG states
        trainer_state.json               step, stage, data position, world size (human-readable)
        export/                          trainable weights as safetensors + config (inference, eval)
      latest                             DeepSpeed's pointer file (zero_to_fp32.py reads it)

Everything is written under ``.tmp-stepNNNNNNNN`` first and renamed when all ranks are done, so a
kill at any moment leaves either a complete checkpoint or a dot-directory that is never picked up.
Old checkpoints are renamed away before they are deleted, for the same reason.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from msmedcap.atomic_files import atomic_write_text

STEP_DIR = re.compile(r"^step(\d{8})$")


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(root: str | Path) -> list:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def rng_states() -> dict:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["device"] = acc.get_rng_state()
    return state


def set_rng_states(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "device" in state:
        get_accelerator().set_rng_state(state["device"])


def _remove_dir(path: Path) -> None:
    """Rename first (atomic) so a half-deleted directory never looks complete."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


class CheckpointManager:
    """Saves and finds one stage's checkpoints. All ranks call :meth:`save` and :meth:`load`."""

    def __init__(self, root: str | Path, keep_last: int, rank: int, barrier: Callable[[], None]):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    def save(self, engine, step: int, client_state: dict, export: Callable[[Path], None]) -> Path:
        """Checkpoint ``engine`` at ``step``; ``export(dir)`` (rank 0) writes the weights export."""
        tag = step_tag(step)
        tmp_tag = f".tmp-{tag}"
        tmp, final = self.root / tmp_tag, self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".t*-step*"):  # leftovers of a killed save or prune
                shutil.rmtree(stale, ignore_errors=True)
        self.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save(rng_states(), tmp / f"rng_rank{self.rank:04d}.pt")
        if self.rank == 0:
            export(tmp / "export")
            atomic_write_text(tmp / "trainer_state.json",
                              json.dumps({k: v for k, v in client_state.items() if k != "config"}, indent=2, default=str))
        self.barrier()
        if self.rank == 0:
            if final.exists():  # an earlier run's checkpoint of the same step (--overwrite)
                _remove_dir(final)
            os.rename(tmp, final)
            atomic_write_text(self.root / "latest", tag)
            for old in complete_checkpoints(self.root)[:-self.keep_last] if self.keep_last > 0 else []:
                _remove_dir(old)
        self.barrier()
        return final

    def load(self, engine, path: Path) -> dict:
        """Restore engine (weights, optimizer, scheduler) from checkpoint directory ``path``; return
        the client state. RNG states are returned, not applied: the caller applies them after the
        data loader has started (starting it draws from torch's generator)."""
        path = Path(path)
        load_path, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_module_strict=False,  # frozen weights are not in it
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        rng_file = path / f"rng_rank{self.rank:04d}.pt"
        client_state = dict(client_state or {})
        client_state["rng"] = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
        return client_state
