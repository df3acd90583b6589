"""The exceptions that mean "the engine is gone": a bottom leaf every layer may import."""

from __future__ import annotations


class EngineStoppedError(RuntimeError):
    """The engine stopped (unloaded, shut down or crashed) before the request ended.

    The next call starts a new engine; ``ChatBaichuan2`` retries such a call
    (``max_retries``) when no token had been produced yet.
    """


class ModelUnloadedError(EngineStoppedError):
    """The loaded model was unloaded before the request started; load it again."""
