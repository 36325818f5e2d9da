"""The thread that owns the model: runs the `Generator` and every model mutation.

HTTP handlers never touch the model. They submit requests and commands
(weight loads, aborts, pause) through a queue; the worker runs commands
between generation steps, so a weight update never lands in the middle of a
forward pass.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from megatron_gppo.rollout.generator import Generator
from megatron_gppo.rollout.protocol import SequenceRequest, SequenceResult

logger = logging.getLogger(__name__)


class GenerationWorker:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.paused = False
        self._commands: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._stopped = False

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and end the thread."""
        if self._stopped:
            return
        self.call(lambda g: g.fail_all("server shutting down"))
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout)

    def call(self, fn: Callable[[Generator], Any]) -> Future:
        """Run `fn(generator)` on the worker thread between steps; the future holds its result."""
        future: Future = Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(self.generator))
            except BaseException as err:  # handed to the caller, who decides
                future.set_exception(err)

        self._commands.put(command)
        return future

    def submit(self, seq: SequenceRequest, on_done: Callable[[SequenceResult], None]) -> None:
        self._commands.put(lambda: self.generator.add(seq, on_done))

    def set_paused(self, paused: bool) -> Future:
        def apply(_: Generator) -> None:
            self.paused = paused
        return self.call(apply)

    def _loop(self) -> None:
        while True:
            busy = self.generator.has_work() and not self.paused
            try:
                # Block only when there is nothing to generate.
                command = self._commands.get(block=not busy, timeout=None)
            except queue.Empty:
                command = False
            while command is not False:
                if command is None:
                    return
                command()
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = False
            if self.paused:
                continue
            try:
                self.generator.step()
            except Exception as err:  # keep serving: fail this batch, not the server
                logger.exception("generation step failed")
                self.generator.fail_all(f"generation failed: {err}")


__all__ = ["GenerationWorker"]
