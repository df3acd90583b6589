"""The vLLM engine's life: checked before it starts, replaced after a death, shut down cleanly.

The truths here are outside the engine: the native backend's greedy text, the
operating system's process table (psutil), what a fresh interpreter prints on exit.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file, save_file

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines import vllm as vllm_engines
from langchain_baichuan2.engines.base import EngineStoppedError
from langchain_baichuan2.loading import CheckpointError
from langchain_baichuan2.testing import make_tiny_checkpoint
from tests.vllm.conftest import SHAPES, VLLM_KWARGS

ROOT = Path(__file__).resolve().parents[2]
LONG = {"max_tokens": 1500, "model_kwargs": {"min_new_tokens": 1500}}


def vllm_processes() -> set[int]:
    """Pids of this process's live (not zombie) vLLM engine and worker processes."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("VLLM") and child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def engine_threads() -> set[int]:
    """Idents of the threads our engines and vLLM's client start in this process."""
    names = ("baichuan2-vllm", "MPClientEngineMonitor")
    return {t.ident for t in threading.enumerate() if t.name in names and t.ident}


def own_engine(folder, **settings):
    """A vLLM chat model whose engine no other test shares (its own max_model_len)."""
    common = {"temperature": 0, "max_tokens": 24, "dtype": "float32"}
    return ChatBaichuan2(
        model=str(folder),
        backend="vllm",
        vllm_kwargs={**VLLM_KWARGS, "max_model_len": 1024},
        **{**common, **settings},
    )


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_vllm_starts(tmp_path):
    # The weights and config agree on 1000 rows; the tokenizer has 1800 pieces, so
    # its ids 1000..1799 would index past the embedding and kill vLLM's engine.
    shape = {**SHAPES["7b"], "weights": "safetensors", "num_shards": 1}
    folder = make_tiny_checkpoint(tmp_path, "7b", **shape)
    path = folder / "model.safetensors"
    weights = load_file(path)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:1000].clone()
    save_file(weights, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 1000
    (folder / "config.json").write_text(json.dumps(config))

    before = vllm_processes()
    with pytest.raises(CheckpointError, match="1800 pieces but config.json says vocab_size 1000"):
        own_engine(folder).invoke("Hi")
    assert vllm_processes() == before  # vLLM never started


@pytest.mark.slow
def test_an_engine_death_is_reported_and_the_next_call_starts_a_new_engine(vllm_folders):
    folder = vllm_folders["7b"]
    native = ChatBaichuan2(model=str(folder), temperature=0, max_tokens=24, dtype="float32")
    vllm = own_engine(folder)
    before = vllm_processes()
    first = vllm.engine()
    cores = [
        psutil.Process(pid)
        for pid in vllm_processes() - before
        if "EngineCor" in psutil.Process(pid).name()
    ]
    assert len(cores) == 1

    stream = vllm.stream("Tell me a very long story.", **LONG)
    next(stream)  # a token came: the call is not retried, its error reaches the caller
    cores[0].kill()
    with pytest.raises(EngineStoppedError) as stopped:
        list(stream)
    message = str(stopped.value)
    assert message.startswith("The vLLM engine stopped: its engine process EngineCore")
    assert "exited with code -9" in message and "next call starts a new engine" in message

    reply = vllm.invoke("What is the capital of France?")
    expected = native.invoke("What is the capital of France?")
    assert reply.content == expected.content
    assert reply.usage_metadata["output_tokens"] == expected.usage_metadata["output_tokens"]
    assert vllm.engine() is not first
    assert first.failure() == "it was shut down"  # the dead engine was cleaned up
    assert vllm.unload()
    assert vllm_processes() <= before


class FakeEngine:
    """Stands in for VllmEngine: slow to start and to stop, counts live instances."""

    lock = threading.Lock()
    live = 0
    most_live = 0
    made: list["FakeEngine"] = []

    def __init__(self, *args, **kwargs):
        with FakeEngine.lock:
            FakeEngine.live += 1
            FakeEngine.most_live = max(FakeEngine.most_live, FakeEngine.live)
            FakeEngine.made.append(self)
        self.closed = False
        time.sleep(0.01)

    def failure(self):
        return "it was shut down" if self.closed else None

    def shutdown(self):
        if self.closed:
            return
        time.sleep(0.01)
        self.closed = True
        with FakeEngine.lock:
            FakeEngine.live -= 1


def test_starts_and_shutdowns_of_one_engine_never_overlap(vllm_folders, monkeypatch):
    monkeypatch.setattr(vllm_engines, "VllmEngine", FakeEngine)
    settings = {
        "revision": None,
        "source": "local",
        "dtype": "float32",
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "vllm_kwargs": {"fake": True},  # a configuration no real engine has
    }
    name = str(vllm_folders["7b"])
    done = threading.Event()
    got: list[FakeEngine] = []

    def caller():
        while not done.is_set():
            got.append(vllm_engines.vllm_engine_for(name, **settings))

    callers = [threading.Thread(target=caller) for _ in range(3)]
    for thread in callers:
        thread.start()
    while not got:  # the callers are running
        time.sleep(0.001)
    for _ in range(100):
        vllm_engines.shutdown_vllm_engine(name, **settings)
        time.sleep(0.002)  # room for a caller to start the next engine
    done.set()
    for thread in callers:
        thread.join()
    vllm_engines.shutdown_vllm_engine(name, **settings)

    assert len(FakeEngine.made) > 1 and got
    assert FakeEngine.most_live == 1  # no start while the previous engine was stopping
    assert FakeEngine.live == 0 and all(e.closed for e in FakeEngine.made)  # no orphan


@pytest.mark.slow
def test_unloading_while_threads_call_leaves_no_engine_behind(vllm_folders):
    folder = vllm_folders["7b"]
    native = ChatBaichuan2(model=str(folder), temperature=0, max_tokens=8, dtype="float32")
    vllm = own_engine(folder, max_tokens=8)
    expected = native.invoke("Hi").content
    processes, threads = vllm_processes(), engine_threads()
    assert vllm.invoke("Hi").content == expected
    answers: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def caller():
        while not done.is_set():
            try:
                answers.append(vllm.invoke("Hi").content)
            except Exception as e:  # checked below: only a clear "engine stopped" error
                errors.append(e)

    callers = [threading.Thread(target=caller) for _ in range(3)]
    for thread in callers:
        thread.start()
    time.sleep(1)
    assert vllm.unload()  # while the three callers are busy
    deadline = time.monotonic() + 300
    while len(answers) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)  # the callers started a new engine and it serves them
    done.set()
    for thread in callers:
        thread.join()
    vllm.unload()

    assert len(answers) >= 6 and set(answers) == {expected}
    assert all(isinstance(e, EngineStoppedError) for e in errors), errors
    assert all(str(e).startswith("The vLLM engine stopped: ") for e in errors)
    assert vllm_processes() <= processes
    assert engine_threads() <= threads


@pytest.mark.slow
def test_unload_then_exit_prints_no_shutdown_noise(vllm_folders, tmp_path):
    # A user who kept the engine (or an exception that holds it) until the interpreter
    # exits: vLLM's AsyncLLM.__del__ ran at exit and failed ("Exception ignored in").
    script = tmp_path / "unload.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from langchain_baichuan2 import ChatBaichuan2

            KEPT = []

            if __name__ == "__main__":
                llm = ChatBaichuan2(
                    model={str(vllm_folders["7b"])!r}, backend="vllm", temperature=0,
                    max_tokens=4, dtype="float32", vllm_kwargs={VLLM_KWARGS!r},
                )
                llm.invoke("Hi")
                KEPT.append(llm.engine())
                assert llm.unload()
                print("unloaded", flush=True)
            """
        )
    )
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "unloaded" in run.stdout
    # Nor may the shutdown kill vLLM's engine process (that leaks its shared memory).
    for noise in ("Exception ignored", "AsyncLLM.__del__", "leaked shared_memory", "force kill"):
        assert noise not in run.stderr, run.stderr[-3000:]
