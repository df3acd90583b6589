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


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="baichuan2")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="streaming multi-turn chat in the terminal")
    chat.add_argument("--model", required=True, help="local folder or model id")
    chat.add_argument("--revision", default=None)
    chat.add_argument(
        "--source", default="auto", choices=["auto", "local", "modelscope", "huggingface"]
    )
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    chat.add_argument("--quantization", default=None, choices=["4bit", "8bit"])
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    demo = commands.add_parser("demo", help="offline demo on a tiny random checkpoint")
    demo.add_argument("--variant", default="7b", choices=["7b", "13b"])
    demo.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint")
    args = parser.parse_args(argv)

    if args.command == "demo":
        run_demo(args.dir, args.variant)
        return 0
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
        llm.engine()  # load now, not at the first question
    except KeyboardInterrupt:
        print("\nInterrupted while loading.", file=sys.stderr)
        return 130
    except Exception as e:  # any load failure: one clear line, no traceback
        reason = " ".join(str(e).split())
        print(f"error: could not load {args.model!r}: {reason}", file=sys.stderr)
        return 1
    run_chat(llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
