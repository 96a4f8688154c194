"""SIGINT/SIGTERM handlers for the span of a block, shared by the training loop (which only
records the signal and stops after the chunk in progress, with a checkpoint) and the CLI
(which stops at once elsewhere, with a message)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signal_handler(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Within the block ``handler`` handles SIGINT and SIGTERM; the previous handlers come back
    afterwards, put back with both signals blocked (POSIX): a signal arriving in between would
    otherwise meet a half-restored pair, and a raising ``handler`` would leave itself in place.
    Off the main thread, where Python cannot install handlers, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        posix = hasattr(signal, "pthread_sigmask")
        if posix:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for s, h in old.items():
                signal.signal(s, h)
        finally:
            if posix:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
