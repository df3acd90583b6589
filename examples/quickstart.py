"""Quickstart: the model card's two questions, asked through ChatBaichuan2.

python examples/quickstart.py                       # baichuan-inc/Baichuan2-7B-Chat
python examples/quickstart.py --model /path/to/Baichuan2-13B-Chat --quantization 4bit
python examples/quickstart.py --demo                # offline, tiny random checkpoint
"""

import argparse
import sys
import tempfile

from langchain_baichuan2 import ChatBaichuan2

QUESTIONS = ["解释一下“温故而知新”", "登鹳雀楼->王之涣\n夜雨寄北->"]


def build_parser() -> argparse.ArgumentParser:
    """The command line, with a help text for every option."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="baichuan-inc/Baichuan2-7B-Chat",
        help="a local model folder or a model id (default: %(default)s)",
    )
    parser.add_argument(
        "--quantization",
        choices=["4bit", "8bit"],
        default=None,
        help="quantize the weights at load with bitsandbytes (default: none)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run offline on a tiny random checkpoint in a temporary folder, removed "
        "afterwards (its answers are random text); --model is then ignored",
    )
    return parser


def ask(model: str, quantization: str | None) -> None:
    """Stream the answers to QUESTIONS."""
    llm = ChatBaichuan2(model=model, quantization=quantization, max_tokens=256)
    for question in QUESTIONS:
        print(f"\n用户：{question}\nBaichuan 2：", end="", flush=True)
        for chunk in llm.stream(question):
            print(chunk.text, end="", flush=True)
        print()


def main() -> None:
    args = build_parser().parse_args()
    if not args.demo:
        ask(args.model, args.quantization)
        return
    from langchain_baichuan2.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="baichuan2-demo-") as folder:
        print("(demo: random weights, so the answers are random text)")
        ask(str(make_tiny_checkpoint(folder)), args.quantization)


if __name__ == "__main__":
    from langchain_baichuan2 import CheckpointError, DownloadError

    try:
        main()
    except (DownloadError, CheckpointError) as e:  # what to do, in one message
        sys.exit(f"error: {e}")
