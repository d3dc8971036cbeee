"""Stopping when asked: preemption (SLURM / Kubernetes send SIGTERM, or the signal chosen with
`--signal`, e.g. SIGUSR1, some seconds before SIGKILL) and Ctrl-C.

A signal only sets a flag. At the next optimizer-step boundary the ranks agree on it
(`train.distributed.max_over_ranks`: a CPU all-reduce, no device sync), save a
complete checkpoint and leave with `EXIT_STOPPED`, which a requeue script tells from a failure;
the requeued job resumes from that checkpoint as from any other. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading

from train.distributed import max_over_ranks

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_STOPPED = 75  # EX_TEMPFAIL ("try again"): preempted, a checkpoint saved, requeue me


class Stopped(Exception):
    """The job stopped at a step boundary after a signal, its checkpoint saved."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(
            f"stopped by {signal_name} at step {step}: checkpoint {checkpoint} saved; the same "
            f"command resumes from it (exit status {EXIT_STOPPED})"
        )


class StopRequest:
    """The signals' flag, and the ranks' agreement on it at a step boundary."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def install(self) -> StopRequest:
        """Catch `SIGNALS` (main thread only: a Ray Tune trial's thread leaves them alone)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: now, without a checkpoint
                raise KeyboardInterrupt
            return  # the launcher forwards the SIGTERM the ranks already had
        self.signal = name
        log.warning("%s received: stopping after this optimizer step, with a checkpoint", name)

    def agreed(self) -> str | None:
        """The same answer on every rank: the signal if any rank has one (collective)."""
        mine = SIGNALS.index(signal.Signals[self.signal]) + 1 if self.signal else 0
        code = max_over_ranks(mine)
        if code and self.signal is None:  # another rank's signal, this rank's stop
            self.signal = SIGNALS[code - 1].name
        return self.signal


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader workers leave the stop to their parent: a SIGTERM sent to the whole process
    group (or forwarded by the launcher) must not kill them mid-batch."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
