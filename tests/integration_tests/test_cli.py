"""The command line: the chat REPL's commands and the offline demo."""

import argparse
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.__main__ import build_parser, main, run_chat

ROOT = Path(__file__).resolve().parents[2]


def scripted(lines):
    answers = iter(lines)

    def read(prompt):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_repl_keeps_history_clears_it_and_exits(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=6)
    out = []
    history = run_chat(llm, scripted(["Hello", "And then?", "exit", "never read"]), out.append)
    assert [type(m) for m in history] == [HumanMessage, AIMessage, HumanMessage, AIMessage]
    # The second answer saw the first round: it equals invoking with that history.
    assert history[3].content == llm.invoke(history[:3]).content
    history = run_chat(llm, scripted(["Hello", "clear", "Again"]), out.append)
    assert [m.content for m in history if isinstance(m, HumanMessage)] == ["Again"]
    assert "(history cleared)\n" in out


def test_ctrl_c_stops_the_answer_not_the_program(tiny_7b, monkeypatch):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=50)
    written = []

    def write(text):
        written.append(text)
        if len(written) == 4:  # the user presses Ctrl-C while the answer streams
            raise KeyboardInterrupt

    history = run_chat(llm, scripted(["Tell me a story", "Hi"]), write)
    assert " [interrupted]" in written
    assert len(history) == 4  # the program went on to the next question


def test_demo_command_runs_offline(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "random" in out and "invoke:" in out and "stream:" in out and "chain:" in out
    assert (tmp_path / "demo" / "config.json").is_file()


@pytest.mark.parametrize(
    "model, reason",
    [("/nonexistent/folder", "does not exist"), ("baichuan-inc/../../etc", "model id")],
)
def test_a_load_failure_is_one_clear_line_and_a_nonzero_exit(model, reason, capsys):
    assert main(["chat", "--model", model]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: could not load {model!r}:")
    assert reason in err[-1]
    assert not any("Traceback" in line for line in err)


def test_a_folder_that_is_not_a_model_is_named(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path)]) == 1
    assert "config.json" in capsys.readouterr().err


def test_the_demo_removes_its_temporary_checkpoint(monkeypatch, capsys):
    import tempfile
    from pathlib import Path

    made = []
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    assert main(["demo"]) == 0
    assert made and not Path(made[0].name).exists()


def test_the_console_script_is_declared():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    # Outside the package, so that Ctrl-C during the package's imports ends quietly.
    assert pyproject["project"]["scripts"]["baichuan2"] == "langchain_baichuan2_cli:main"
    shipped = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["only-include"]
    assert "langchain_baichuan2_cli.py" in shipped


def test_ctrl_c_during_the_imports_exits_130_without_a_traceback():
    # The package's import is made slow, so that SIGINT surely arrives during it.
    script = textwrap.dedent(
        """
        import sys, time

        class SlowPackageImport:
            def find_spec(self, name, path=None, target=None):
                if name == "langchain_baichuan2":
                    print("importing", flush=True)
                    time.sleep(120)
                return None

        sys.meta_path.insert(0, SlowPackageImport())
        sys.argv = ["baichuan2", "demo"]
        from langchain_baichuan2_cli import main
        sys.exit(main())
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "importing\n"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["interrupted"]


def test_the_console_script_gives_ctrl_c_back_to_the_chat_after_the_imports(monkeypatch):
    import langchain_baichuan2.__main__
    import langchain_baichuan2_cli

    seen = []
    monkeypatch.setattr(
        langchain_baichuan2.__main__, "main", lambda: seen.append(signal.getsignal(signal.SIGINT))
    )
    langchain_baichuan2_cli.main()
    assert seen == [signal.default_int_handler]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("occupant", ["file in it", "file instead"])
def test_demo_refuses_a_dir_that_is_not_new_or_empty(occupant, tmp_path, capsys):
    folder = tmp_path / "demo"
    if occupant == "file in it":
        folder.mkdir()
        (folder / "notes.txt").write_text("keep me")
    else:
        folder.write_text("keep me")
    assert main(["demo", "--dir", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: --dir") and "not an empty folder" in err[0]
    kept = folder / "notes.txt" if occupant == "file in it" else folder
    assert kept.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted({"demo", kept.name})


def test_demo_writes_into_an_existing_empty_dir(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "config.json").is_file()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


@pytest.mark.parametrize("command", ["chat", "demo"])
def test_help_explains_every_option(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping inside its text
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    options = [a for a in _subcommands()[command]._actions if a.option_strings != ["-h", "--help"]]
    assert options
    for option in options:
        assert option.help and option.help.strip(), f"{option.option_strings} has no help text"
        assert option.option_strings[-1] in shown
        assert " ".join(option.help.split()) in shown


def test_the_subcommands_are_chat_and_demo():
    assert set(_subcommands()) == {"chat", "demo"}


def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(tiny_7b):
    # The load is made slow, so that SIGINT surely arrives during it.
    script = textwrap.dedent(
        """
        import sys, time
        from langchain_baichuan2 import ChatBaichuan2
        from langchain_baichuan2.__main__ import main

        def slow_load(self, model=None):
            print("loading", flush=True)
            time.sleep(120)

        ChatBaichuan2.engine = slow_load
        sys.exit(main(["chat", "--model", sys.argv[1]]))
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tiny_7b)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "loading\n"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted"


def test_ctrl_c_during_the_demo_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    import langchain_baichuan2.testing

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(langchain_baichuan2.testing, "make_tiny_checkpoint", interrupted)
    assert main(["demo", "--dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
