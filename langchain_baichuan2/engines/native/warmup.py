"""The native engine's warm-up: buffers sized once and every step shape compiled.

A warm-up is asked for by any thread and run by the worker when no row is running
(``SlotModel.warm_up`` needs every slot free); callers wait for it to end.
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
        wanted: Asked for and not yet run (the worker runs it once idle).
        ended: Set once a warm-up ended, or serving ended without one.
    """

    def __init__(self) -> None:
        self.wanted = False
        self.ended = threading.Event()

    def ask(self) -> bool:
        """Ask for a warm-up; False if one is already wanted or has ended."""
        if self.wanted or self.ended.is_set():
            return False
        self.wanted = True
        return True

    def run(self, slot_model: SlotModel, lock: threading.RLock) -> None:
        """Run the wanted warm-up (on the worker, no row running); never raises."""
        self.wanted = False
        try:
            with lock:
                slot_model.warm_up()
        except Exception:  # serving goes on uncompiled
            logger.exception("The Baichuan2 engine's warm-up failed")
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
