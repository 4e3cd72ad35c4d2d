"""Atomic, rotating, verified DeepSpeed checkpoints that resume bit-exactly and unpickle nothing.

Layout of one stage's checkpoint root::

    checkpoints/
      step00000200/                      complete checkpoint (a directory name without a dot)
        mp_rank_00_model_states.pt       DeepSpeed: trainable weights only (exclude_frozen_parameters)
        *_zero_pp_rank_*_optim_states.pt DeepSpeed: each rank's ZeRO-2 optimizer partition
        rng_rank0000.pt ...              each rank's python/numpy/torch RNG states (tensors and numbers)
        trainer_state.json               step, stage, data position, world size (human-readable)
        export/                          trainable weights as safetensors + config (inference, eval)
        manifest.json                    every file above: bytes and sha256 (written last)
      latest                             DeepSpeed's pointer file (zero_to_fp32.py reads it)

Everything is written under ``.tmp-stepNNNNNNNN`` first and renamed when all ranks are done, so a
kill at any moment leaves either a complete checkpoint or a dot-directory that is never picked up.
Old checkpoints are renamed away before they are deleted, for the same reason. A complete
checkpoint whose files no longer match its manifest (truncated, deleted, changed afterwards) is
named and passed over by :func:`usable_checkpoint`.

What a checkpoint holds is one :class:`TrainState` (stage, step, the data position with the seed,
world size and worker count it is a function of, and this rank's RNG states) next to the engine's own
state; :meth:`CheckpointManager.save` writes them together and :meth:`CheckpointManager.load` reads
them together, refusing a checkpoint whose data position this run cannot continue (another world size,
``data.num_workers`` or seed). :meth:`CheckpointManager.due` is the interval rule and
:meth:`CheckpointManager.export_final` the finished stage's export. Every directory (checkpoint or
export) is published by one writer, :class:`AtomicDir`.

Nothing is unpickled on resume: every ``.pt`` file is read with ``torch.load(weights_only=True)``
(DeepSpeed's own loader, ``TorchCheckpointEngine.load``, uses ``weights_only=False``; the engine's
loader is replaced by :func:`safe_load` in :meth:`CheckpointManager.load`). The few non-tensor
classes DeepSpeed itself stores are allow-listed by name (``SAFE_GLOBALS``); anything else is
refused with :class:`UnsafeCheckpoint`, naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from msmedcap.atomic_files import atomic_write_text
from msmedcap.data.shards import sha256_file
from msmedcap.train.signals import fault_point

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, incomplete, unreadable); the message names the file."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that holds pickled objects a weights-only load refuses: never unpickled."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (a full disk, most often); the previous checkpoint is untouched."""


STEP_DIR = re.compile(r"^step(\d{8})$")


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint whose data position this run cannot continue (another world size, worker count
    or seed): refused, never resumed with a different data order."""


@dataclass
class DataPosition:
    """Where a rank's training stream is. The stream is a function of all four: the same micro-batch
    count means the same next batch only with the same seed, world size and ``data.num_workers``."""
    seed: int
    world_size: int
    num_workers: int
    micro_batches: int = 0


@dataclass
class TrainState:
    """Everything a stage's checkpoint holds besides the engine's own state (weights, optimizer, LR
    scheduler, written by DeepSpeed). ``rng``: this rank's RNG states, read by :meth:`CheckpointManager.load`
    and applied by the caller once its data loader has started (starting it draws from torch's generator)."""
    stage: int
    step: int
    data: DataPosition
    config: Optional[dict] = None
    rng: Optional[dict] = None
    # The validation's best-so-far record (msmedcap.train.validation.Validator.record), None without validation.
    validation: Optional[dict] = None

    def client_state(self) -> dict:
        """What DeepSpeed stores with the engine (``trainer_state.json``: the same without the config)."""
        state = {"stage": self.stage, "step": self.step, "world_size": self.data.world_size, "seed": self.data.seed,
                 "data": {"micro_batches": self.data.micro_batches, "num_workers": self.data.num_workers}}
        if self.validation is not None:
            state["validation"] = self.validation
        return {**state, "config": self.config}

    @classmethod
    def from_client_state(cls, state: dict, rng: Optional[dict] = None) -> "TrainState":
        data = state.get("data") or {}
        return cls(stage=state.get("stage"), step=int(state.get("step", 0)),
                   data=DataPosition(seed=state.get("seed"), world_size=state.get("world_size"),
                                     num_workers=data.get("num_workers"), micro_batches=int(data.get("micro_batches", 0))),
                   config=state.get("config"), rng=rng, validation=state.get("validation"))

    def check_continues(self, now: DataPosition, path) -> None:
        """Raise :class:`IncompatibleCheckpoint` unless this run's data position parameters are the
        checkpoint's: another world size or worker count splits the stream differently, another seed
        shuffles it differently, so the resumed run would not see the batches the interrupted one would have."""
        keys = (("world_size", "ranks (WORLD_SIZE)"), ("num_workers", "data.num_workers"), ("seed", "train.seed"))
        differ = [(label, getattr(self.data, k), getattr(now, k)) for k, label in keys
                  if getattr(self.data, k) is not None and getattr(self.data, k) != getattr(now, k)]
        if differ:
            what = ", ".join(f"{label} {was} then, {is_} now" for label, was, is_ in differ)
            raise IncompatibleCheckpoint(
                f"{path}: written with another data position ({what}); resuming would continue a different "
                "data order than the interrupted run's. Resume with the same number of ranks, data.num_workers "
                "and train.seed, or start afresh with --overwrite (or another train.output_dir)")


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def read_train_state(path: str | Path) -> TrainState:
    """Checkpoint ``path``'s :class:`TrainState` from its ``trainer_state.json`` (no RNG, no config):
    enough to check, before any model is built, that this run can continue it."""
    file = Path(path) / "trainer_state.json"
    try:
        return TrainState.from_client_state(json.loads(file.read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


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
    """This process's RNG states as tensors, numbers and strings only (loads with weights_only=True)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {"format": 2,
             "python": {"version": py_version, "state": torch.tensor(py_internal, dtype=torch.int64),
                        "gauss": py_gauss},
             "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
             "torch": torch.get_rng_state()}
    if acc.device_name() != "cpu":
        state["device"] = acc.get_rng_state()
    return state


def set_rng_states(state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "device" in state:
        get_accelerator().set_rng_state(state["device"])


# --------------------------------------------------------------------------- reading without unpickling
# Classes DeepSpeed's own checkpoint files hold besides tensors and containers (found by loading
# ZeRO-1/2 bf16/fp16/fp32 checkpoints of deepspeed 0.19 with weights_only=True): allow-listed by name.
SAFE_GLOBAL_NAMES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def _safe_globals() -> list:
    import importlib

    found = []
    for name in SAFE_GLOBAL_NAMES:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return found


def safe_load(path, map_location=None):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's few allow-listed classes; anything
    else pickled in the file raises :class:`UnsafeCheckpoint`, a damaged file :class:`CheckpointError`."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise UnsafeCheckpoint(f"{path}: holds a pickled object that a weights-only load refuses ({detail.strip()}); "
                               "it was not unpickled. A checkpoint from this trainer holds only tensors and plain "
                               "data: resume only from checkpoints you trust and that this version wrote") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None


def make_engine_loads_safe(engine) -> bool:
    """Route DeepSpeed's checkpoint reads (model states, ZeRO partitions) through :func:`safe_load`.
    True when done; False for checkpoint engines other than DeepSpeed's torch one (Nebula, the
    decoupled writer), which keep their own loader."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        return False
    ce.load = lambda path, map_location=None: safe_load(path, map_location)
    return True


# --------------------------------------------------------------------------- manifests
def write_manifest(directory: Path) -> None:
    """Bytes and sha256 of every file under ``directory`` (the checkpoint's last file)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    atomic_write_text(directory / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def check_checkpoint(path: Path) -> Optional[str]:
    """None when every file of checkpoint ``path`` is there as written; else what is wrong, naming the file."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing (a checkpoint written by an older msmedcap, or damaged)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path / MANIFEST} is unreadable ({e})"
    required = ("trainer_state.json", "mp_rank_00_model_states.pt")
    for name in required:
        if name not in files:
            return f"{path}: {name} is not in its manifest"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != meta["bytes"]:
            return f"{f} is {size} bytes, {meta['bytes']} were written (truncated or changed)"
        if sha256_file(f) != meta["sha256"]:
            return f"{f} does not match the sha256 written with it (changed or corrupted)"
    return None


def usable_checkpoint(root, log: Callable[[str], None] = print) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` that passes :func:`check_checkpoint`; each one
    passed over is logged, naming the bad file. None when there is none at all; raises
    :class:`CheckpointError` when there are checkpoints but every one is damaged."""
    done = complete_checkpoints(root)
    problems = []
    for path in reversed(done):
        problem = check_checkpoint(path)
        if problem is None:
            if problems:
                log(f"resuming from the previous complete checkpoint {path}")
            return path
        problems.append(problem)
        log(f"checkpoint {path} is damaged, not resuming from it: {problem}")
    if problems:
        raise CheckpointError(f"no usable checkpoint under {root}: " + "; ".join(problems) +
                              ". Restore the files, resume from an export, or start afresh with --overwrite")
    return None


def _remove_dir(path: Path, fault: Optional[dict] = None) -> None:
    """Rename first (atomic) so a half-deleted directory never looks complete."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    if fault is not None:
        fault_point("checkpoint.prune", **fault)
    shutil.rmtree(trash, ignore_errors=True)


class AtomicDir:
    """A directory that appears complete or not at all: written under ``.tmp-NAME`` beside its final
    name, then renamed onto it (an earlier directory of that name is renamed away first, then deleted).
    A kill at any moment leaves the final name absent or complete; dot-names are never read as results.
    The one writer of checkpoints and exports."""

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".tmp-{self.final.name}")

    def begin(self) -> Path:
        """The empty temporary directory's path (what a killed writer left there is removed)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def publish(self) -> Path:
        if self.final.exists():  # an earlier run's directory of the same name (--overwrite)
            _remove_dir(self.final)
        os.rename(self.tmp, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_leftovers(root) -> None:
    """Delete what a killed save (``.tmp-stepN``) or prune (``.trash-stepN-PID``) left under ``root``."""
    root = Path(root)
    if root.is_dir():
        for stale in root.glob(".t*-step*"):
            shutil.rmtree(stale, ignore_errors=True)


def _disk_full(e: BaseException, where: Path) -> bool:
    """ENOSPC/EDQUOT, or torch's zip writer's RuntimeError ("file write failed") on a full disk."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer reports a short write as e.g. "[enforce fail at inline_container.cc] unexpected
    # pos 20224 vs 20116": judge by the space left instead of the message
    if isinstance(e, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(where).free < (1 << 20)
        except OSError:
            return False
    return False


class CheckpointManager:
    """Saves, finds and loads one stage's checkpoints and writes its final export. All ranks call
    :meth:`save`, :meth:`load` and :meth:`export_final` (rank 0 writes what only one rank writes).
    ``export(dir)`` writes the trainable weights' export (each checkpoint has one, and so has the
    finished stage, at ``export_dir``); ``every``: ``train.ckpt_every``."""

    def __init__(self, root: str | Path, keep_last: int, rank: int, barrier: Callable[[], None], every: int = 0,
                 export: Optional[Callable[[Path], None]] = None, export_dir: Optional[Path] = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier
        self.every = every
        self.export = export
        self.export_dir = Path(export_dir) if export_dir is not None else None

    def due(self, step: int, total_steps: int, stopping: bool = False) -> bool:
        """Checkpoint after this step? Every ``every`` steps, at the stage's last step, and when stopping."""
        return stopping or step == total_steps or (self.every > 0 and step % self.every == 0)

    def _write_failed(self, e: BaseException, tag: str, tmp: Path) -> CheckpointWriteError:
        shutil.rmtree(tmp, ignore_errors=True)  # give back what the incomplete checkpoint took
        previous = latest_checkpoint(self.root)
        try:
            free = f"{shutil.disk_usage(self.root).free / 2**20:.1f} MB free"
        except OSError:
            free = "free space unknown"
        what = "no space left on device" if _disk_full(e, self.root) else f"{type(e).__name__}: {e}"
        return CheckpointWriteError(
            f"rank {self.rank}: writing checkpoint {tag} under {self.root} failed: {what} ({free}); the incomplete "
            f"checkpoint was removed, the previous complete checkpoint ({previous or 'none'}) is untouched. Free space, "
            "then restart with --resume auto")

    def save(self, engine, state: TrainState) -> Path:
        """Checkpoint ``engine`` and ``state`` (at ``state.step``): DeepSpeed's files, each rank's RNG
        states, and on rank 0 the export, ``trainer_state.json`` and the manifest; published when every
        rank is done, then the checkpoints beyond ``keep_last`` are pruned."""
        step, tag = state.step, step_tag(state.step)
        target = AtomicDir(self.root / tag)
        tmp = target.tmp
        at = {"stage": state.stage, "step": step, "rank": self.rank}
        if self.rank == 0:
            remove_leftovers(self.root)
            target.begin()
        self.barrier()
        try:
            fault_point("checkpoint.begin", **at, path=tmp)
            engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=state.client_state(), save_latest=False,
                                   exclude_frozen_parameters=True)
            fault_point("checkpoint.after_engine_save", **at, path=tmp)
            torch.save(rng_states(), tmp / f"rng_rank{self.rank:04d}.pt")
            fault_point("checkpoint.after_rng", **at, path=tmp)
            if self.rank == 0:
                if self.export is not None:
                    self.export(tmp / "export")
                atomic_write_text(tmp / "trainer_state.json",
                                  json.dumps({k: v for k, v in state.client_state().items() if k != "config"},
                                             indent=2, default=str))
                fault_point("checkpoint.after_export", **at, path=tmp)
        except (OSError, RuntimeError) as e:
            if isinstance(e, OSError) or _disk_full(e, self.root):  # not a collective's error: those propagate
                raise self._write_failed(e, tag, tmp) from e
            raise
        self.barrier()
        if self.rank == 0:
            try:
                write_manifest(tmp)
                fault_point("checkpoint.before_rename", **at, path=tmp)
            except (OSError, RuntimeError) as e:
                raise self._write_failed(e, tag, tmp) from e
            target.publish()
            fault_point("checkpoint.after_rename", **at)
            try:
                atomic_write_text(self.root / "latest", tag)
            except OSError as e:  # the checkpoint itself is complete; only DeepSpeed's pointer is stale
                print(f"warning: could not update {self.root / 'latest'}: {e}", file=sys.stderr, flush=True)
            fault_point("checkpoint.after_latest", **at)
            for old in complete_checkpoints(self.root)[:-self.keep_last] if self.keep_last > 0 else []:
                _remove_dir(old, fault=at)
        self.barrier()
        return target.final

    def load(self, engine, path: Path, expect: Optional[DataPosition] = None) -> TrainState:
        """Restore engine (weights, optimizer, scheduler) and the :class:`TrainState` from checkpoint
        directory ``path``. With ``expect`` (this run's seed, world size, workers), a checkpoint written
        with other ones is refused (:class:`IncompatibleCheckpoint`) before anything is loaded. Every file
        is read with weights_only=True (:func:`safe_load`). The RNG states are returned in the state, not
        applied: the caller applies them after its data loader has started."""
        path = Path(path)
        if expect is not None:
            read_train_state(path).check_continues(expect, path)
        if not make_engine_loads_safe(engine):
            print(f"warning: DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__} keeps its own "
                  "loader (it may unpickle); only msmedcap's own files are read weights-only", file=sys.stderr)
        load_path, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_module_strict=False,  # frozen weights are not in it
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        rng_file = path / f"rng_rank{self.rank:04d}.pt"
        rng = safe_load(rng_file) if rng_file.is_file() else None
        if rng is not None and not (isinstance(rng, dict) and rng.get("format") == 2):
            raise CheckpointError(f"{rng_file}: not an RNG state this version wrote")
        return TrainState.from_client_state(dict(client_state or {}), rng=rng)

    def export_final(self, stage: int, step: int) -> Path:
        """Rank 0 writes the finished stage's export to ``export_dir``, atomically: the export's
        existence marks the stage as finished (``--resume auto`` skips it)."""
        if self.rank == 0:
            target = AtomicDir(self.export_dir)
            self.export(target.begin())
            fault_point("stage.before_export_rename", stage, step, self.rank)
            target.publish()
            fault_point("stage.after_export", stage, step, self.rank)
        return self.export_dir
