"""SIGTERM / SIGUSR1 -> checkpoint at the next step boundary, then exit 0.

Schedulers (SLURM ``--signal``, preemption, ``deepspeed``'s launcher forwarding SIGTERM) warn a job
before killing it. The handler only records the signal; the training loop asks
:meth:`StopRequest.agreed` once per optimizer step, which all-reduces the flag so every rank stops
at the same step even when the signal reached them at different moments.

Install before any DataLoader worker is forked: workers inherit the handler, so a signal sent to
the whole process tree (what the launcher does) does not kill them mid-batch.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signum: Optional[int] = None
        self.agreed_signum = 0
        self.pid = os.getpid()
        for s in signals:
            signal.signal(s, self._handle)

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
