"""The user documentation runs as written: README.md's Python blocks and the notebook.

Real model ids in the README are swapped for tiny random checkpoints of the same
shape family, so nothing is downloaded; everything else in the blocks runs unchanged.
"""

from __future__ import annotations

import ast
import builtins
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from pydantic import model_validator

import langchain_baichuan2
from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.testing import make_tiny_legacy_4bit_checkpoint

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NOTEBOOK = ROOT / "examples" / "notebook.ipynb"

CI_RUN = ROOT / ".ci" / "run"
# The index of torch's CPU builds: the README's torch lines name it, .ci/run finds the
# wheel in its local wheel folder instead.
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
TEST_COMMANDS = (
    "python -m pytest",
    "python -m pytest -m slow",
    "python -m pytest --ignore=tests/vllm",
)
MINIMAL_INSTALL = (
    f"pip install torch {CPU_INDEX}",
    "pip install -e .",
)

_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
_PLACEHOLDER_FOLDER = re.compile(r'"/path/to/[^"]*"')
_MODEL_ID = re.compile(r"baichuan-inc/[\w.-]+")
# Blocks that start vLLM or talk to its server: tests/vllm/ runs them.
VLLM_BLOCK = re.compile(r'backend="vllm"|tensor_parallel_size=|ChatOpenAI\(')

# Random weights rarely emit EOS: cap the answers so every block finishes quickly. The cap
# is the README's own max_tokens for tools and structured output, so those run as written.
DOC_MAX_TOKENS = 256
# The docstrings leave grammar_max_length to the reader: bound JSON strings there, so that
# constrained output closes on random weights (see ChatBaichuan2.grammar_max_length).
DOC_GRAMMAR_MAX_LENGTH = 8


class _RandomWeightsChat(ChatBaichuan2):
    """ChatBaichuan2 with greedy answers of at most DOC_MAX_TOKENS tokens."""

    @model_validator(mode="before")
    @classmethod
    def _short_answers(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        values["max_tokens"] = min(values.get("max_tokens") or DOC_MAX_TOKENS, DOC_MAX_TOKENS)
        values.setdefault("temperature", 0)
        return values


class _BoundedJsonChat(_RandomWeightsChat):
    """_RandomWeightsChat whose JSON strings are bounded unless the example bounds them."""

    @model_validator(mode="before")
    @classmethod
    def _bounded_json(cls, values: Any) -> Any:
        if isinstance(values, dict) and "grammar_max_length" not in values:
            return {**values, "grammar_max_length": DOC_GRAMMAR_MAX_LENGTH}
        return values


def _check_forced_tool_call(namespace: dict[str, Any]) -> None:
    reply = namespace["reply"]
    assert len(reply.tool_calls) == 1, f"no tool call; invalid: {reply.invalid_tool_calls}"
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather"
    assert set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str)


def _check_cut_tool_call(namespace: dict[str, Any]) -> None:
    cut = namespace["cut"]
    assert cut.tool_calls == []
    assert cut.invalid_tool_calls and cut.invalid_tool_calls[0]["error"]
    assert cut.response_metadata["finish_reason"] == "length"


def _check_structured_output(namespace: dict[str, Any]) -> None:
    poem_class = namespace["Poem"]
    assert isinstance(namespace["poem"], poem_class)
    assert namespace["result"]["parsing_error"] is None
    assert isinstance(namespace["result"]["parsed"], poem_class)


def _check_tiny_checkpoint(namespace: dict[str, Any]) -> None:
    assert (Path(namespace["folder"]) / "config.json").is_file()
    assert namespace["tiny"].invoke("你好").content


# What the README promises of these blocks, checked after each runs on random weights.
README_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    'bind_tools([get_weather], tool_choice="get_weather")': _check_forced_tool_call,
    "max_tokens=8)": _check_cut_tool_call,
    "with_structured_output(Poem": _check_structured_output,
    "make_tiny_checkpoint(": _check_tiny_checkpoint,
}


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """Each fenced ```python block with the line number its code starts on."""
    return [
        (markdown.count("\n", 0, match.start(1)) + 1, match.group(1))
        for match in _PYTHON_BLOCK.finditer(markdown)
    ]


def swap_models(code: str, checkpoints: dict[str, Path]) -> str:
    """Replace real model ids and placeholder folders with tiny checkpoint paths."""
    # Longest id first: "...-7B-Chat" is a prefix of "...-7B-Chat-4bits".
    for model_id in sorted(checkpoints, key=len, reverse=True):
        code = code.replace(f'"{model_id}"', repr(str(checkpoints[model_id])))

    def folder(match: re.Match[str]) -> str:
        variant = "13B" if "13B" in match.group(0) else "7B"
        return repr(str(checkpoints[f"baichuan-inc/Baichuan2-{variant}-Chat"]))

    return _PLACEHOLDER_FOLDER.sub(folder, code)


@pytest.fixture(scope="module")
def checkpoints(
    tiny_7b: Path, tiny_13b: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The tiny checkpoint that stands in for each real model id."""
    legacy_4bit = make_tiny_legacy_4bit_checkpoint(tmp_path_factory.mktemp("tiny7b4bits"), "7b")
    return {
        "baichuan-inc/Baichuan2-7B-Chat": tiny_7b,
        # tiny_13b is 320 wide: bitsandbytes' CPU 4-bit kernel needs multiples of 64.
        "baichuan-inc/Baichuan2-13B-Chat": tiny_13b,
        "baichuan-inc/Baichuan2-7B-Chat-4bits": legacy_4bit,
    }


def vllm_engine_blocks() -> list[tuple[int, str]]:
    """The README's Python blocks that start a vLLM engine in their own process."""
    return [
        (line, code)
        for line, code in python_blocks(README.read_text(encoding="utf-8"))
        if VLLM_BLOCK.search(code) and "ChatOpenAI(" not in code
    ]


def _bash_lines(markdown: str | None = None) -> list[str]:
    """The commands of the bash blocks, in order, without their comments."""
    markdown = README.read_text(encoding="utf-8") if markdown is None else markdown
    bash = "\n".join(_BASH_BLOCK.findall(markdown))
    return [line.split("#")[0].strip() for line in bash.splitlines()]


def ci_install_commands() -> list[str]:
    """The pip commands that .ci/run executes, as a user types them (no --quiet)."""
    commands = []
    for line in CI_RUN.read_text(encoding="utf-8").splitlines():
        if line.startswith("python3 -m pip "):
            command = line.split("||")[0].replace("python3 -m pip", "pip", 1)
            commands.append(" ".join(word for word in command.split() if word != "--quiet"))
    return commands


def test_readme_full_install_is_what_ci_runs():
    readme = README.read_text(encoding="utf-8")
    section = readme[readme.index("### Full install") :]
    block = _BASH_BLOCK.search(section).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    ci = ci_install_commands()
    assert len(ci) == 3, ci
    # The only difference: CI has the CPU wheel of torch locally, a reader needs the index.
    assert lines == [f"{ci[0]} {CPU_INDEX}", *ci[1:]]


def test_readme_torch_lines_are_complete_and_say_cpu_or_gpu():
    bash = "\n".join(_BASH_BLOCK.findall(README.read_text(encoding="utf-8")))
    torch_lines = [line for line in bash.splitlines() if line.startswith("pip install torch")]
    assert len(torch_lines) >= 3
    for line in torch_lines:
        command, _, comment = line.partition("#")
        assert "--index-url https://download.pytorch.org/whl/" in command, line
        assert ("CPU" in comment) != ("GPU" in comment), f"say CPU or GPU: {line!r}"


def test_readme_shows_the_test_commands_and_the_demo():
    lines = _bash_lines()
    for command in (*TEST_COMMANDS, "python -m langchain_baichuan2 demo"):
        assert command in lines, f"README bash blocks lack the command {command!r}"


def test_readme_says_clone_then_installs_minimally_before_the_ci_recipe():
    readme = README.read_text(encoding="utf-8")
    assert not re.search(r"<[^>\n]*URL[^>\n]*>", readme), "a placeholder URL to fill in"
    install = readme[readme.index("## Install") :]
    first_block = install.index("```")
    assert "clone this repository" in " ".join(install[:first_block].split())
    lines = _bash_lines()
    order = [*MINIMAL_INSTALL, f"pip install torch==2.13.0 {CPU_INDEX}"]
    positions = [lines.index(command) for command in order]  # ValueError names a missing one
    assert positions == sorted(positions), f"README install steps out of order: {order}"


def test_project_urls_do_not_pass_the_models_pages_off_as_this_package():
    import tomllib

    urls = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]
    assert urls
    for label, url in urls.items():
        assert len(label) <= 32, f"core metadata limits URL labels to 32 characters: {label}"
        own = label.lower() in {"homepage", "source", "repository", "documentation"}
        assert not (own and "baichuan-inc" in url), f"{label} = {url} is the models' page"
        assert "baichuan-inc" not in url or "Baichuan2" in label


def _free_names(code: str) -> set[str]:
    """Names a block reads but neither assigns, defines nor imports (nor builtins)."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return loaded - bound


def test_readme_blocks_that_continue_say_what_they_need():
    readme = README.read_text(encoding="utf-8")
    previous_end, continued = 0, 0
    for match in _PYTHON_BLOCK.finditer(readme):
        lead_in = readme[previous_end : match.start()]
        line = readme.count("\n", 0, match.start(1)) + 1
        for name in sorted(_free_names(match.group(1))):
            assert f"`{name}`" in lead_in, f"README.md:{line}: say which block defines {name}"
            continued += 1
        previous_end = match.end()
    assert continued >= 7  # llm (6 blocks), forced, get_weather


def test_readme_vllm_scripts_guard_their_main():
    # vLLM's engine core runs in a spawned process that imports the main module again.
    blocks = vllm_engine_blocks()
    assert len(blocks) >= 2
    for line, code in blocks:
        for statement in ast.parse(code).body:
            guarded = isinstance(statement, ast.If) and ast.unparse(statement.test) in (
                "__name__ == '__main__'",
                "'__main__' == __name__",
            )
            assert guarded or isinstance(statement, ast.Import | ast.ImportFrom), (
                f"README.md:{line + statement.lineno - 1}: vLLM script code outside "
                'if __name__ == "__main__":'
            )


def test_readme_python_blocks_run(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setattr(langchain_baichuan2, "ChatBaichuan2", _RandomWeightsChat)
    monkeypatch.chdir(tmp_path)  # blocks that write a folder write it here
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no python blocks"
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    checked = set()
    for line, code in blocks:
        if VLLM_BLOCK.search(code):
            continue
        code = swap_models(code, checkpoints)
        unknown = _MODEL_ID.findall(code)
        assert not unknown, f"README.md:{line}: no tiny stand-in for {unknown}"
        # Blocks build on each other (llm, tools), as a reader running them in order would.
        exec(compile(code, f"README.md:{line}", "exec", dont_inherit=True), namespace)
        for marker, check in README_CHECKS.items():
            if marker in code:
                check(namespace)
                checked.add(marker)
    assert checked == set(README_CHECKS), "README.md lost a checked example"


_DOC_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


@pytest.mark.parametrize("cls", ["ChatBaichuan2", "Baichuan2Embeddings"])
def test_class_docstring_examples_run(
    cls: str, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    import asyncio
    import textwrap

    doc = getattr(langchain_baichuan2, cls).__doc__
    monkeypatch.setattr(langchain_baichuan2, "ChatBaichuan2", _BoundedJsonChat)
    blocks = [textwrap.dedent(m.group(2)) for m in _DOC_BLOCK.finditer(doc)]
    assert len(blocks) >= 4, f"{cls}'s docstring lost its examples"
    namespace: dict[str, Any] = {"__name__": "__doc__"}
    for i, code in enumerate(blocks):
        code = swap_models(code, checkpoints)
        if "await " in code:  # the Async section: run it inside an event loop
            code = "async def _example():\n" + textwrap.indent(code, "    ")
            exec(compile(code, f"{cls}.__doc__[{i}]", "exec", dont_inherit=True), namespace)
            asyncio.run(namespace["_example"]())
        else:
            exec(compile(code, f"{cls}.__doc__[{i}]", "exec", dont_inherit=True), namespace)


def _current_python_kernel(folder: Path) -> KernelManager:
    """A kernel manager for a ``python3`` kernel of this interpreter.

    The spec is written into ``folder`` and only that folder is searched, so neither a
    missing registration nor a ``python3`` spec of another interpreter can interfere.
    """
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(folder / "python3")
    specs = KernelSpecManager(kernel_dirs=[str(folder)])
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def test_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    temporary = tmp_path / "tmp"  # the kernel's temporary folder (TMPDIR)
    temporary.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    stored = [i for i, cell in enumerate(code_cells) if cell.outputs or cell.execution_count]
    assert not stored, f"code cells {stored} are stored with outputs; clear them"

    kernel = _current_python_kernel(tmp_path / "kernels")
    client = NotebookClient(
        notebook,
        km=kernel,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    try:
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        if kernel.has_kernel:  # nbclient shuts down only kernels it created itself
            kernel.shutdown_kernel(now=True)

    errors = [
        output for cell in code_cells for output in cell.outputs if output.output_type == "error"
    ]
    assert not errors
    retrieval = next(cell for cell in code_cells if "similarity_search" in cell.source)
    printed = "".join(output.get("text", "") for output in retrieval.outputs)
    assert printed.rstrip().endswith("温故而知新，可以为师矣。")  # the exact-copy query's document
    memory = next(cell for cell in code_cells if "messages remembered" in cell.source)
    printed = "".join(output.get("text", "") for output in memory.outputs)
    assert printed.rstrip().endswith("4 messages remembered")
    warnings = [
        output.text
        for cell in code_cells
        for output in cell.outputs
        if output.output_type == "stream" and "deprecat" in output.text.lower()
    ]
    assert not warnings, f"the notebook shows a deprecation warning: {warnings}"
    # The kernel is killed, not shut down: the notebook's own last cell must clean up.
    assert not list(temporary.glob("baichuan2-*")), "the tiny checkpoint was left behind"


def test_tool_calls_and_structured_output_work_without_triton(tiny_7b: Path):
    # The README's install-size section: on a CPU, xgrammar never needs triton.
    script = textwrap.dedent(
        """
        import importlib.util, sys
        sys.modules["triton"] = None  # as if triton were not installed
        from langchain_core.tools import tool
        from pydantic import BaseModel
        from langchain_baichuan2 import ChatBaichuan2

        @tool
        def get_weather(city: str) -> str:
            \"\"\"Get the weather for a city.\"\"\"
            return "sunny"

        class Poem(BaseModel):
            title: str

        llm = ChatBaichuan2(
            model=sys.argv[1], temperature=0, max_tokens=256, grammar_max_length=8
        )
        forced = llm.bind_tools([get_weather], tool_choice="get_weather")
        (call,) = forced.invoke("Weather in Paris?").tool_calls
        assert call["name"] == "get_weather" and set(call["args"]) == {"city"}
        assert isinstance(llm.with_structured_output(Poem).invoke("A poem?"), Poem)
        assert importlib.util.find_spec("triton") is None
        print("ok without triton")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_7b)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok without triton"
