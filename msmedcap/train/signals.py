"""SIGTERM / SIGUSR1 -> checkpoint at the next step boundary, then exit 0.

Schedulers (SLURM ``--signal``, preemption, ``deepspeed``'s launcher forwarding SIGTERM) warn a job
before killing it. The handler only records the signal; the training loop asks
:meth:`StopRequest.agreed` at its log and checkpoint steps (not every step: it is a collective),
which all-reduces the flag so every rank stops at the same step even when the signal reached them at
different moments.

Install before any DataLoader worker is forked (the trainer's loader start checks
:meth:`StopRequest.installed`): workers inherit the handler, so a signal sent to the whole process
tree (what the launcher does) does not kill them mid-batch.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signum: Optional[int] = None
        self.agreed_signum = 0
        self.pid = os.getpid()
        self.signals = tuple(signals)
        for s in self.signals:
            signal.signal(s, self._handle)

    def installed(self) -> bool:
        """This process's handler of every stop signal (what forked workers must inherit)."""
        return os.getpid() == self.pid and all(signal.getsignal(s) == self._handle for s in self.signals)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked data worker: ignore, the rank decides
            return
        if self.signum is None:
            self.signum = signum
            print(f"received {signal.Signals(signum).name}: checkpointing at the next step boundary",
                  file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        """The signal any rank received (the agreed one: ranks may get it moments apart)."""
        signum = self.agreed_signum or self.signum
        return signal.Signals(signum).name if signum else "none"

    def agreed(self, device) -> bool:
        """True on every rank once any rank has received a stop signal (a collective call)."""
        import torch.distributed as dist

        flag = torch.tensor([float(self.signum or 0)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.agreed_signum = int(flag.item())
        return bool(self.agreed_signum)


# --------------------------------------------------------------------------- fault injection
FAULT_ENV = "MSMEDCAP_FAULT"
FAULT_ACTIONS = ("kill", "enospc", "hang")


def fault_point(name: str, stage: Optional[int] = None, step: Optional[int] = None, rank: Optional[int] = None,
                path=None) -> None:
    """A named moment where the fault tests (tests/integration/test_faults.py) strike, deterministically.

    ``MSMEDCAP_FAULT=ACTION@NAME[@STAGE.STEP][#RANK]`` (several separated by ``,``): when this
    process reaches point NAME (at that stage and step, on that rank; any when omitted), ``kill``
    sends itself SIGKILL (no cleanup, as an OOM kill or a lost node), ``enospc`` raises the
    ``OSError`` a full disk gives, ``hang`` stops itself (SIGSTOP: alive but silent, as a stuck
    rank). Unset (always, outside tests) this costs one environment lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        action, _, where = item.strip().partition("@")
        where, _, want_rank = where.partition("#")
        point, _, at = where.partition("@")
        if point != name or (want_rank and rank is not None and int(want_rank) != rank):
            continue
        if at:
            want_stage, _, want_step = at.partition(".")
            if (want_stage and stage is not None and int(want_stage) != stage) or (
                    want_step and step is not None and int(want_step) != step):
                continue
        print(f"{FAULT_ENV}: {action} at {name} (stage {stage}, step {step}, rank {rank})", file=sys.stderr, flush=True)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # never reached: SIGKILL is delivered at once
        elif action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (simulated by {FAULT_ENV})", str(path or name))
        elif action == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            raise ValueError(f"{FAULT_ENV}={spec!r}: unknown action {action!r} (one of {FAULT_ACTIONS})")
