"""Quickstart: the model card's two questions, asked through ChatBaichuan2.

python examples/quickstart.py                       # baichuan-inc/Baichuan2-7B-Chat
python examples/quickstart.py --model /path/to/Baichuan2-13B-Chat --quantization 4bit
python examples/quickstart.py --demo                # offline, tiny random checkpoint
"""

import argparse
import tempfile

from langchain_baichuan2 import ChatBaichuan2

QUESTIONS = ["解释一下“温故而知新”", "登鹳雀楼->王之涣\n夜雨寄北->"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="baichuan-inc/Baichuan2-7B-Chat")
    parser.add_argument("--quantization", choices=["4bit", "8bit"], default=None)
    parser.add_argument("--demo", action="store_true", help="use a tiny random checkpoint")
    args = parser.parse_args()

    model = args.model
    if args.demo:
        from langchain_baichuan2.testing import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(tempfile.mkdtemp(prefix="baichuan2-")))
        print("(demo: random weights, so the answers are random text)")
    llm = ChatBaichuan2(model=model, quantization=args.quantization, max_tokens=256)
    for question in QUESTIONS:
        print(f"\n用户：{question}\nBaichuan 2：", end="", flush=True)
        for chunk in llm.stream(question):
            print(chunk.text, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
