"""Fine-tunes: one base model with PEFT LoRA adapters, chosen per call.

python examples/lora.py --adapter sql=./sql-lora --adapter law=./law-lora
python examples/lora.py --model /path/to/Baichuan2-13B-Chat --adapter sql=./sql-lora --merge
python examples/lora.py --demo      # offline, tiny random checkpoint and adapters

The base model and every adapter answer the same question: the adapter is chosen per
call (``invoke(..., adapter="sql")``) or per runnable (``bind(adapter="sql")``), all
from one copy of the base weights. ``--merge`` also folds the first adapter into a
copy of the weights (``merge_adapter=True``) and asks it once more.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from langchain_baichuan2 import ChatBaichuan2

QUESTION = "把“列出所有年龄大于 30 岁的用户”写成一条 SQL 语句"
# The official fine-tune script's adapter (W_pack, r=1) and an "all linear" one.
ALL_LINEAR = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_pair(text: str) -> tuple[str, str]:
    """``NAME=PATH`` as a (name, path) pair."""
    name, sep, path = text.partition("=")
    if not (sep and name.strip() and path.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name.strip(), path.strip()


def build_parser() -> argparse.ArgumentParser:
    """The command line, with a help text for every option."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="baichuan-inc/Baichuan2-7B-Chat",
        help="the base model: a local folder or a model id, or an adapter folder whose "
        "adapter_config.json names its base (default: %(default)s)",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        type=adapter_pair,
        default=[],
        metavar="NAME=PATH",
        help="a PEFT LoRA adapter (a folder, or a ModelScope or Hub id) under a name "
        "of your choice; repeat it for several adapters",
    )
    parser.add_argument(
        "--question",
        default=QUESTION,
        help="what to ask the base model and each adapter (default: a text-to-SQL request)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="the longest answer, in tokens (default: %(default)s; the demo uses 24)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="also fold the first adapter into a copy of the weights (merge_adapter=True: "
        "base speed, that adapter only) and ask it once more",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run offline on a tiny random checkpoint and two tiny random adapters in a "
        "temporary folder, removed afterwards (their answers are random text); implies "
        "--merge, and --model and --adapter are then ignored",
    )
    return parser


def show(label: str, text: str) -> None:
    """Print one answer under its label."""
    print(f"\n[{label}] {text}", flush=True)


def ask(model: str, adapters: dict[str, str], question: str, max_tokens: int, merge: bool) -> None:
    """Ask the base model and each adapter ``question``, greedily."""
    llm = ChatBaichuan2(model=model, adapters=adapters, temperature=0, max_tokens=max_tokens)
    print(f"用户：{question}")
    show("base model", llm.invoke(question).content)
    for name in adapters:  # one base, the adapter chosen per call
        show(f"adapter={name!r}, per call", llm.invoke(question, adapter=name).content)
    if not adapters:
        return
    first = next(iter(adapters))
    bound = llm.bind(adapter=first)  # a runnable that always uses this adapter
    show(f"bind(adapter={first!r})", bound.invoke(question).content)
    if merge:
        merged = ChatBaichuan2(
            model=model,
            adapter=adapters[first],
            merge_adapter=True,  # folded into its own copy of the weights
            temperature=0,
            max_tokens=max_tokens,
        )
        show(f"{first!r} merged into the weights", merged.invoke(question).content)
        merged.unload()
    llm.unload()


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if not args.demo:
        adapters = dict(args.adapter)
        if args.merge and not adapters:
            parser.error("--merge needs an adapter to merge (--adapter NAME=PATH)")
        ask(args.model, adapters, args.question, args.max_tokens, args.merge)
        return
    from langchain_baichuan2.testing import make_tiny_adapter, make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="baichuan2-demo-") as folder:
        print("(demo: random weights, so the answers are random text)")
        base = make_tiny_checkpoint(Path(folder) / "model")
        adapters = {
            # fine-tune/fine-tune.py's output: LoRA on W_pack, r=1, lora_alpha 32
            "sql": make_tiny_adapter(base, Path(folder) / "sql-lora"),
            "law": make_tiny_adapter(base, Path(folder) / "law-lora", ALL_LINEAR, r=8, seed=1),
        }
        named = {name: str(path) for name, path in adapters.items()}
        ask(str(base), named, args.question, min(args.max_tokens, 24), merge=True)


if __name__ == "__main__":
    from langchain_baichuan2 import CheckpointError, DownloadError

    try:
        main()
    except (DownloadError, CheckpointError) as e:  # what to do, in one message
        sys.exit(f"error: {e}")
