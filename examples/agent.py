"""An agent with two real tools, built with LangChain's create_agent on ChatBaichuan2.

    python examples/agent.py                       # baichuan-inc/Baichuan2-13B-Chat
    python examples/agent.py --demo                # offline, tiny random checkpoint

Tool calls are grammar-constrained, so even a model never trained on tools produces
calls that parse and match each tool's arguments.
"""

from __future__ import annotations

import argparse
import ast
import operator
import sys
import tempfile
from datetime import date

from langchain_core.tools import tool

from langchain_baichuan2 import ChatBaichuan2

try:
    from langchain.agents import create_agent
except ImportError:  # one clear line instead of a traceback
    raise SystemExit(
        'examples/agent.py needs LangChain\'s agents: pip install -e ".[agents]"'
    ) from None

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
}


def _evaluate(node: ast.AST) -> float:
    """Evaluate an arithmetic syntax tree (numbers and + - * / ** only)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers and + - * / ** are allowed")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '(3 + 4) * 12'."""
    try:
        return str(_evaluate(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        return f"error: {e}"


@tool
def days_until(iso_date: str) -> str:
    """Count the days from today until a date given as YYYY-MM-DD."""
    try:
        return str((date.fromisoformat(iso_date) - date.today()).days)
    except ValueError as e:
        return f"error: {e}"


def build_agent(llm: ChatBaichuan2):
    """The agent graph: the model decides when to call the tools."""
    return create_agent(
        llm,
        tools=[calculator, days_until],
        system_prompt="You are a helpful assistant. Use the tools for arithmetic and dates.",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line, with a help text for every option."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="baichuan-inc/Baichuan2-13B-Chat",
        help="a local model folder or a model id (default: %(default)s)",
    )
    parser.add_argument(
        "--question",
        default="What is (3 + 4) * 12, and how many days until 2030-01-01?",
        help="what to ask the agent (default: an arithmetic and a date question)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run offline on a tiny random checkpoint in a temporary folder, removed "
        "afterwards (its choices and text are random); --model is then ignored",
    )
    return parser


def run(model: str, question: str) -> None:
    """Ask the agent ``question`` and print every message of its run."""
    llm = ChatBaichuan2(model=model, temperature=0, max_tokens=128, grammar_max_length=24)
    agent = build_agent(llm)
    state = agent.invoke({"messages": [("human", question)]}, config={"recursion_limit": 8})
    for message in state["messages"]:
        calls = getattr(message, "tool_calls", None)
        print(f"[{message.type}] {message.content!r}" + (f" tool_calls={calls}" if calls else ""))


def main() -> None:
    args = build_parser().parse_args()
    if not args.demo:
        run(args.model, args.question)
        return
    from langchain_baichuan2.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="baichuan2-demo-") as folder:
        print("(demo: random weights, so the agent's choices and text are random)")
        run(str(make_tiny_checkpoint(folder)), args.question)


if __name__ == "__main__":
    from langchain_baichuan2 import CheckpointError, DownloadError

    try:
        main()
    except (DownloadError, CheckpointError) as e:  # what to do, in one message
        sys.exit(f"error: {e}")
