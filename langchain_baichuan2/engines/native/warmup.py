"""The native engine's warm-up: buffers sized once, then every step class compiled.

A warm-up is asked for by any thread. The worker fixes the buffers' storage when no
row is running (``SlotModel.prepare_warm_up`` needs every slot free, and it is quick);
the compile then runs on a background thread (``SlotModel.compile_steps``) while the
worker keeps serving, uncompiled until each step class is ready. Callers of
``wait`` wait for the compile to end.
"""

from __future__ import annotations

import logging
import threading

from langchain_baichuan2.engines.base import EngineStoppedError
from langchain_baichuan2.engines.native.slot_model import SlotModel

logger = logging.getLogger(__name__)


class WarmUp:
    """Whether a warm-up is wanted, and whether one has ended.

    Attributes:
        wanted: Asked for and not yet started (the worker starts it once idle).
        started: The worker has started it (it runs once).
        ended: Set once a warm-up's compile ended, or serving ended without one.
    """

    def __init__(self) -> None:
        self.wanted = False
        self.started = False
        self.ended = threading.Event()

    def ask(self) -> bool:
        """Ask for a warm-up; False if one is already wanted, running or has ended."""
        if self.wanted or self.started or self.ended.is_set():
            return False
        self.wanted = True
        return True

    def run(self, slot_model: SlotModel, lock: threading.RLock) -> None:
        """Fix the buffers (on the worker, no row running), then compile in the background.

        Never raises: serving goes on uncompiled if the warm-up fails.
        """
        self.wanted, self.started = False, True
        try:
            with lock:
                slot_model.prepare_warm_up()
        except Exception:
            logger.exception("The Baichuan2 engine's warm-up failed")
        if not slot_model.compile or slot_model.compile_failed:
            self.ended.set()
            return
        threading.Thread(
            target=self._compile, args=(slot_model,), name="baichuan2-compile", daemon=True
        ).start()

    def _compile(self, slot_model: SlotModel) -> None:
        try:
            slot_model.compile_steps()
        finally:
            self.ended.set()

    def wait(self, timeout: float | None, closed: bool) -> None:
        """Wait for the warm-up to end.

        Raises:
            EngineStoppedError: The engine was shut down before warming up.
            TimeoutError: It did not end within ``timeout`` seconds.
        """
        if closed and not self.ended.is_set():
            raise EngineStoppedError("The Baichuan2 engine was shut down")
        if not self.ended.wait(timeout):
            raise TimeoutError(f"The warm-up did not end within {timeout} s")
