"""EngineLoop: runs Engine.step() on a background thread and hands tokens to asyncio callers (the HTTP layer)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.serving.engine import Engine
from gateway.serving.scheduler import Request

logger = logging.getLogger(__name__)
IDLE_STEP_WAIT_S = 0.01  # after a step that ran nothing (or raised), before the next: no busy loop


@dataclass
class LoopStats:
    """Counters the metrics endpoint reads."""

    requests: dict[str, int] = field(
        default_factory=lambda: {"ok": 0, "error": 0, "rejected": 0, "cancelled": 0, "timeout": 0})
    tokens_generated: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    started: float = field(default_factory=time.time)


class EngineLoop:
    """Owns the engine's stepping while serving. `submit` is called from the event loop; each token and the
    end of each request are delivered to an asyncio.Queue as ("token", id) / ("done", request)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stats = LoopStats()
        self._wake = threading.Event()
        self._stop = False
        self._timed_out: set[str] = set()  # requests already counted as "timeout" (not again when they finish)
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], loop: asyncio.AbstractEventLoop, trace_context: Any = None,
               **params) -> tuple[Request, asyncio.Queue]:
        """Queue a request (ValueError / QueueFull propagate before anything runs); trace_context: the client's
        OpenTelemetry context its span continues (None: a new trace)."""
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(request: Request, token: int) -> None:
            self.stats.tokens_generated += 1
            loop.call_soon_threadsafe(queue.put_nowait, ("token", token))

        def on_finish(request: Request) -> None:
            if request.request_id in self._timed_out:
                self._timed_out.discard(request.request_id)
            else:
                outcome = "error" if request.error else "cancelled" if request.finish_reason == "cancelled" else "ok"
                self.stats.requests[outcome] += 1
            loop.call_soon_threadsafe(queue.put_nowait, ("done", request))

        request = self.engine.submit(prompt, on_token=on_token, on_finish=on_finish,
                                     trace_context=trace_context, **params)
        self._wake.set()
        return request, queue

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """Stop generating for a request: its client went away ('cancelled'), or its text met a stop string
        ('stop', counted as a request served)."""
        if not request.done:
            self.engine.cancel(request.request_id, reason)
            self._wake.set()

    def expire(self, request: Request) -> None:
        """The request ran past scheduler.request_timeout_s: count it as a timeout and stop generating for it."""
        if not request.done:
            logger.warning("request %s: no result within scheduler.request_timeout_s=%g s; cancelling it",
                           request.request_id, self.engine.config.scheduler.request_timeout_s)
            self._timed_out.add(request.request_id)
            self.stats.requests["timeout"] += 1
            self.cancel(request)

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self.engine.poll_replicas()  # probes of failed replicas land here while idle, never in a scrape
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            start = time.perf_counter()
            idle = False
            try:
                idle = not self.engine.step() and self.engine.last_batch_size == 0
            except Exception:  # step() fails its own requests; this is a bug in it: log it, keep serving
                logger.exception("engine step raised")
                idle = True
            self.stats.steps += 1
            self.stats.step_seconds += time.perf_counter() - start
            if idle:  # work is queued but nothing could run: wait for a change (or a moment) instead of spinning
                self._wake.wait(timeout=IDLE_STEP_WAIT_S)
                self._wake.clear()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Ask the loop thread to end and wait up to timeout_s; returns whether it ended (False: a step still
        runs on it)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.warning("engine loop still running a step after %.1f s", timeout_s)
            return False
        return True

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the loop, then close the engine, but only once no step runs on the loop thread any more (closing
        under a running step would tear the backend down beneath it). Returns whether the engine was closed."""
        if not self.stop(timeout_s):
            logger.error("engine not closed: a step is still running on the engine loop thread after %.1f s; "
                         "its expert groups stay up until that step returns and close() is called again", timeout_s)
            return False
        self.engine.close()
        return True
