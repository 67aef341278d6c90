"""`llama-gate serve --workers N`: N proxy processes accepting from the same listening sockets.

The parent binds (or takes over) the sockets, then forks the workers: each is a whole proxy, with
its own event loop, pools and backends' view, accepting from the one accept queue the sockets
share (the kernel hands each connection to one of them). Python runs one thread of Python at a
time, so this is how a proxy uses more than one core. The workers share backend slots, the fair
order, limits and quotas through Postgres (`proxy.cluster.slots`).

Worker 0 also serves the dashboard and /metrics on their own ports (its sessions live in its
memory, and a port takes one listener), so /metrics counts worker 0's requests only; the ledger
in Postgres has every worker's.

The parent only supervises: it offers the sockets to a successor (`--handover`), forwards SIGTERM
and SIGINT to the workers and waits for them to finish their requests, and starts a worker again
if one dies (it gives up, stopping the others, when workers keep dying right after they start).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from proxy.cli.listen import Handover

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl(2)
REAP_SECONDS = 0.2  # how often the parent looks for workers that ended
# After SIGTERM, how long a worker may take to finish its requests (serve's own limit is 30 s)
# before the parent kills it: nothing may outlive the parent.
STOP_SECONDS = 45.0
EARLY_DEATH_SECONDS = 5.0  # a worker ending sooner than this after it started failed to start
EARLY_DEATHS_TOLERATED = 3  # in a row, before the parent gives up


class WorkersFailed(Exception):
    """The workers keep dying as they start: the message says how the last one ended."""


# Runs worker number `index` (0 to N-1; a replacement takes the number of the one it replaces)
# and calls its second argument once it serves.
Worker = Callable[[int, Callable[[], None]], None]


def supervise(
    workers: int,
    sockets: list[socket.socket],
    run_worker: Worker,
    handover_path: Path | None,
    ready_file: Path | None,
) -> None:
    """Fork `workers` processes running `run_worker` and watch them until SIGTERM/SIGINT; the
    ready file gets the parent's pid once every worker serves."""
    readiness, said_ready = os.pipe()
    os.set_blocking(readiness, False)
    started: dict[int, tuple[float, int]] = {}  # pid -> when it started, its number
    try:
        for index in range(workers):
            pid, at = _fork(run_worker, said_ready, index)
            started[pid] = (at, index)
        log.info("started %d proxy workers (pids %s)", workers, ", ".join(map(str, started)))
        asyncio.run(
            _watch(
                started,
                lambda index: _fork(run_worker, said_ready, index),
                sockets,
                handover_path,
                (ready_file, readiness, workers),
            )
        )
    finally:
        os.close(readiness)
        os.close(said_ready)


def _fork(run_worker: Worker, said_ready: int, index: int) -> tuple[int, float]:
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker: never returns into the parent's code
        code = 0
        try:
            # Not the parent's: its event loop's handlers (a worker forked again, after one
            # died, would ignore SIGTERM until its own loop set them) and its wakeup fd.
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            _stop_with_parent()
            if os.getppid() != parent:  # it died before that took effect
                raise SystemExit(1)
            run_worker(index, lambda: _say_ready(said_ready))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("proxy worker %d failed", os.getpid())
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)
    return pid, time.monotonic()


async def _watch(
    started: dict[int, tuple[float, int]],
    fork: Callable[[int], tuple[int, float]],
    sockets: list[socket.socket],
    handover_path: Path | None,
    readiness: tuple[Path | None, int, int],
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # Offered to a successor only once every worker serves: should they fail to start, the
    # proxy this one was to replace keeps its own offer (and keeps serving).
    handover = Handover(handover_path, sockets) if handover_path else None
    ready_file, ready_pipe, waiting_for = readiness
    early_deaths = 0
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REAP_SECONDS)
            if waiting_for > 0:
                with contextlib.suppress(BlockingIOError):
                    waiting_for -= len(os.read(ready_pipe, 64))
                if waiting_for <= 0:
                    log.info("every proxy worker serves")
                    if handover:
                        handover.start()
                    if ready_file:
                        ready_file.write_text(f"{os.getpid()}\n")
            for pid, status in _reaped(started):
                began, index = started.pop(pid)
                lived = time.monotonic() - began
                if stop.is_set():
                    continue
                how = _ending(status)
                early_deaths = early_deaths + 1 if lived < EARLY_DEATH_SECONDS else 0
                if early_deaths >= EARLY_DEATHS_TOLERATED:
                    stop.set()
                    raise WorkersFailed(
                        f"proxy workers keep stopping as they start (the last {how}); see the "
                        "log above for why"
                    )
                log.warning("proxy worker %d %s after %.0f s; starting another", pid, how, lived)
                new, at = fork(index)
                started[new] = (at, index)
    finally:
        log.info("stopping: the workers finish the requests in flight")
        if handover:
            await handover.close()
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while started:
            await asyncio.sleep(REAP_SECONDS)
            for pid, _status in _reaped(started):
                started.pop(pid)
            if started and time.monotonic() > deadline:
                for pid in started:
                    log.warning("proxy worker %d did not stop in %.0f s; killing it", pid,
                                STOP_SECONDS)  # fmt: skip
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = float("inf")


def _stop_with_parent() -> None:
    """Have the kernel send this worker SIGTERM should its parent die, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing): a worker never outlives its supervisor."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _say_ready(pipe: int) -> None:
    os.write(pipe, b".")


def _reaped(started: dict[int, tuple[float, int]]) -> list[tuple[int, int]]:
    """The workers that ended since last asked, with their wait statuses."""
    ended = []
    for pid in list(started):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped already: it ended, how is not known
            done, status = pid, 0
        if done:
            ended.append((pid, status))
    return ended


def _ending(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
