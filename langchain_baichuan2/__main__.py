"""Command line: ``baichuan2 chat|demo`` (or ``python -m langchain_baichuan2 chat|demo``).

``chat`` is a streaming multi-turn REPL like the official ``cli_demo.py``: ``clear``
forgets the history, ``exit`` quits, Ctrl-C stops the answer being written (not the
program). ``demo`` builds a tiny random checkpoint and runs a chat turn, a stream and a
chain offline; its text is random because its weights are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import cast

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from langchain_baichuan2.chat_models import ChatBaichuan2

WELCOME = "Baichuan2 chat — type `clear` to forget the history, `exit` to quit."


def run_chat(
    llm: ChatBaichuan2,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda text: print(text, end="", flush=True),
) -> list[BaseMessage]:
    """Run the REPL until ``exit`` or end of input; return the final history."""
    history: list[BaseMessage] = []
    write(WELCOME + "\n")
    while True:
        try:
            question = read("\n用户 > ").strip()
        except EOFError:
            write("\n")
            return history
        except KeyboardInterrupt:
            write("\n(type `exit` to quit)\n")
            continue
        if question == "exit":
            return history
        if question == "clear":
            history.clear()
            write("(history cleared)\n")
            continue
        if not question:
            continue
        history.append(HumanMessage(question))
        write("Baichuan 2 > ")
        answer: list[str] = []
        stream = cast(Generator, llm.stream(history))
        try:
            for chunk in stream:
                answer.append(chunk.text)
                write(chunk.text)
        except KeyboardInterrupt:
            stream.close()  # cancels the generation at its next step
            write(" [interrupted]")
        history.append(AIMessage("".join(answer)))
        write("\n")


def run_demo(folder: Path | None = None, variant: str = "7b") -> None:
    """Build a tiny random checkpoint and show invoke, stream and a chain on it."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    from langchain_baichuan2.testing import make_tiny_checkpoint

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="baichuan2-demo-") as temporary:
            run_demo(Path(temporary), variant)  # the folder is removed afterwards
        return
    print(f"Writing a tiny random {variant} checkpoint to {folder} ...")
    make_tiny_checkpoint(folder, variant)  # type: ignore[arg-type]
    print("Note: the weights are random, so the text below is random too.\n")
    llm = ChatBaichuan2(model=str(folder), temperature=0, max_tokens=24)

    reply = llm.invoke("Hello! 你好！")
    print("invoke:", repr(reply.content))
    print("usage:", reply.usage_metadata)
    print("finish:", reply.response_metadata["finish_reason"])

    print("stream: ", end="")
    for chunk in llm.stream([("system", "Be brief."), ("human", "Tell me a story.")]):
        print(chunk.text, end="|", flush=True)
    print()

    prompt = ChatPromptTemplate.from_messages([("human", "Translate to French: {text}")])
    chain = prompt | llm | StrOutputParser()
    print("chain:", repr(chain.invoke({"text": "good morning"})))


def build_parser() -> argparse.ArgumentParser:
    """The ``baichuan2`` argument parser, with a help text for every option."""
    parser = argparse.ArgumentParser(
        prog="baichuan2",
        description="Run Baichuan2 locally: chat with a model, or try the offline demo.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser(
        "chat",
        help="streaming multi-turn chat in the terminal",
        description="Chat with a Baichuan2 model: `clear` forgets the history, `exit` quits, "
        "Ctrl-C stops the answer being written.",
    )
    chat.add_argument(
        "--model",
        required=True,
        help="a local model folder, or a model id such as baichuan-inc/Baichuan2-7B-Chat",
    )
    chat.add_argument(
        "--revision", default=None, help="branch, tag or commit of a model id (default: the latest)"
    )
    chat.add_argument(
        "--source",
        default="auto",
        choices=["auto", "local", "modelscope", "huggingface"],
        help="auto (the default): an existing folder, else ModelScope, else the Hugging Face Hub",
    )
    chat.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weight dtype (default: auto, bfloat16 on a GPU and float32 on a CPU)",
    )
    chat.add_argument(
        "--quantization",
        default=None,
        choices=["4bit", "8bit"],
        help="quantize the weights at load with bitsandbytes (default: none)",
    )
    chat.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature, 0 for greedy (default: the checkpoint's, 0.3)",
    )
    chat.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="most tokens in one answer (default: the checkpoint's, 2048)",
    )
    demo = commands.add_parser(
        "demo",
        help="offline demo on a tiny random checkpoint",
        description="Write a tiny random checkpoint and run a chat turn, a stream and a chain "
        "on it, offline. Its weights are random, so its text is random too.",
    )
    demo.add_argument(
        "--variant",
        default="7b",
        choices=["7b", "13b"],
        help="shape family: 7b (RoPE) or 13b (ALiBi) (default: 7b)",
    )
    demo.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="write the checkpoint into this new or empty folder and keep it, e.g. for "
        "`baichuan2 chat --model DIR` (default: a temporary folder, removed afterwards)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command.

    Ctrl-C while the model loads (or the demo runs) ends the program with one line and
    exit status 130, not a traceback; in the chat it stops only the answer being written.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            if args.dir is not None and _occupied(args.dir):
                print(
                    f"error: --dir {str(args.dir)!r} exists and is not an empty folder; "
                    "give the demo a new or empty folder to write its checkpoint into",
                    file=sys.stderr,
                )
                return 1
            run_demo(args.dir, args.variant)
            return 0
        llm = _load(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if llm is None:
        return 1
    run_chat(llm)
    return 0


def _occupied(folder: Path) -> bool:
    """Whether ``folder`` is a file or a folder with something in it."""
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _load(args: argparse.Namespace) -> ChatBaichuan2 | None:
    """The chat model, loaded now rather than at the first question; None if it failed."""
    try:
        llm = ChatBaichuan2(
            model=args.model,
            revision=args.revision,
            source=args.source,
            dtype=args.dtype,
            quantization=args.quantization,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
        )
        print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
        llm.engine()
    except Exception as e:  # any load failure: one clear line, no traceback
        reason = " ".join(str(e).split())
        print(f"error: could not load {args.model!r}: {reason}", file=sys.stderr)
        return None
    return llm


if __name__ == "__main__":
    sys.exit(main())
