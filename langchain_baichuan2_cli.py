"""Entry point of the ``baichuan2`` command: Ctrl-C while it starts ends it quietly.

Importing ``langchain_baichuan2`` takes seconds (torch, transformers) and registers the
native classes with transformers' Auto classes, so it stays eager. This module lies
outside the package so that the console script can install a Ctrl-C handler *before*
that import: Ctrl-C during it prints one line and exits with status 130, where Python
would print a traceback of the half-done imports.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _quit_while_starting(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C during the imports: one line, exit status 130, nothing else runs."""
    sys.stdout.flush()
    sys.stderr.write("\ninterrupted\n")
    sys.stderr.flush()
    os._exit(130)  # no exception unwinding through half-imported modules


def main() -> int:
    """Import the package under the quiet handler, then run the command line."""
    previous = signal.signal(signal.SIGINT, _quit_while_starting)
    from langchain_baichuan2.__main__ import main as run

    signal.signal(signal.SIGINT, previous)  # the chat's Ctrl-C stops an answer again
    return run()


if __name__ == "__main__":
    sys.exit(main())
