"""The README's "Several machines" commands, run as written on one machine.

vLLM's own multi-node mode: node 0 serves (``python -m langchain_baichuan2.serve``),
node 1 runs ``--headless``; two processes here stand in for two machines. Node 1's
worker builds its half of the model from vLLM's registry, where only this package's
plugin puts Baichuan2, so an answer at all shows the plugin registered in every node's
processes; the answer is compared with the native backend's greedy text. The Ray route
needs vLLM's GPU build and two GPUs, and is skipped elsewhere.
"""

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from langchain_baichuan2 import serve
from tests.integration_tests.test_docs import README
from tests.vllm.conftest import chat_models, free_port, post, running, serving

# Sizes for a shared CPU machine; the README's commands leave them at vLLM's defaults.
TEST_FLAGS = ["--dtype", "float32", "--max-model-len", "2048", "--gpu-memory-utilization", "0.04"]
QUESTION = "What's the weather in 北京?"


def section():
    readme = README.read_text(encoding="utf-8")
    start = readme.index("### Several machines\n")
    return readme[start : readme.index("\n### ", start + 1)]


def block(fence, marker):
    """The section's ``fence`` block that contains ``marker``."""
    (code,) = [
        b for b in re.findall(rf"^```{fence}\n(.*?)^```", section(), re.S | re.M) if marker in b
    ]
    return code


def commands(marker):
    """The commands of the bash block containing ``marker``: (environment, argv)."""
    found = []
    for line in block("bash", marker).splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        env = dict(word.split("=", 1) for word in words if re.match(r"^[A-Z_]+=", word))
        found.append((env, words[len(env) :]))
    return found


def localize(argv, folder, replace):
    """A README command for this machine: the tiny checkpoint, ``replace``d words."""
    replace = {"python": sys.executable, "/models/Baichuan2-13B-Chat": str(folder), **replace}
    return [replace.get(word, word) for word in argv]


def node_commands(folder, split):
    """The two nodes of the README's multi-node block: (argv, environment) each."""
    (node0_env, node0), (node1_env, node1) = commands("--node-rank 0")
    assert node0_env == node1_env == {}
    assert "--headless" in node1 and "--headless" not in node0
    master_port = free_port()
    nodes = []
    for rank, argv in enumerate((node0, node1)):
        here = {"10.0.0.1": "127.0.0.1", "29500": str(master_port)}
        argv = localize(argv, folder, {**here, "--tensor-parallel-size": split})
        assert argv[:3] == [sys.executable, "-m", "langchain_baichuan2.serve"]
        # Each "machine" binds its own rank's OpenMP threads to its own core.
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(rank)}
        nodes.append((argv + TEST_FLAGS, env))
    return nodes


def ask(url):
    """The server's greedy answer to QUESTION (16 tokens, the checkpoint's penalty)."""
    body = {
        "model": "baichuan2",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": 16,
        "repetition_penalty": 1.05,
    }
    return post(f"{url}/v1/chat/completions", body)


def native_answer(folder, text, max_tokens):
    native, _ = chat_models(folder, max_tokens=max_tokens)
    return native.invoke(text).content


def test_the_serve_command_refuses_to_start_where_vllm_would_skip_the_plugin(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert "VLLM_PLUGINS='other' leaves out 'baichuan2'" in serve.plugin_problem()
    with pytest.raises(SystemExit, match="leaves out 'baichuan2'"):
        serve.main(["/models/Baichuan2-13B-Chat"])
    monkeypatch.setenv("VLLM_PLUGINS", "other,baichuan2")
    assert serve.plugin_problem() is None
    monkeypatch.delenv("VLLM_PLUGINS")
    assert serve.plugin_problem() is None
    # The entry point itself, as vLLM finds it; without it (not installed) no start.
    (entry,) = serve.entry_points(group="vllm.general_plugins", name="baichuan2")
    assert entry.value == "langchain_baichuan2.vllm_plugin:register"
    monkeypatch.setattr(serve, "entry_points", lambda **selection: ())
    assert "entry point 'baichuan2' is not installed" in serve.plugin_problem()


@pytest.mark.slow
def test_two_nodes_serve_the_native_greedy_text(vllm_folders):
    """Tensor parallel across the nodes (pipeline parallel ran too, by hand: see README)."""
    folder = vllm_folders["13b-tp"]  # 6 heads: 3 + 3 under tensor parallel
    nodes = node_commands(folder, "--tensor-parallel-size")
    port = free_port()
    nodes[0][0].extend(["--port", str(port)])
    with serving(port, *nodes, seconds=600) as url:
        answer = ask(url)
        fingerprint = answer["system_fingerprint"]
    assert "tp2" in fingerprint
    assert answer["choices"][0]["message"]["content"] == native_answer(folder, QUESTION, 16)


@pytest.mark.slow
def test_chat_baichuan2_in_process_as_node_0(vllm_folders, monkeypatch, capsys):
    folder = vllm_folders["13b-tp"]
    nodes = node_commands(folder, "--tensor-parallel-size")
    code = block("text", "ChatBaichuan2(")
    # What the README says to add to node 1's command for this route.
    limits = re.search(r"add\s+`(--max-num-batched-tokens \d+ --max-num-seqs \d+)`", section())
    node1 = (nodes[1][0] + limits.group(1).split(), nodes[1][1])
    master_port = node1[0][node1[0].index("--master-port") + 1]
    swaps = {
        '"/models/Baichuan2-13B-Chat"': repr(str(folder)),
        '"10.0.0.1"': '"127.0.0.1"',
        "29500": master_port,
        '"max_num_seqs": 256,': '"max_num_seqs": 256, **TEST_KWARGS,',
        # Test sizes: fp32 as the native answer, and a short answer.
        "temperature=0,": 'temperature=0, dtype="float32",',
        "max_tokens=256,": "max_tokens=24,",
    }
    for old, new in swaps.items():
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    namespace = {
        "__name__": "__main__",
        "TEST_KWARGS": {"gpu_memory_utilization": 0.04, "max_model_len": 2048},
    }
    with running(node1) as check:
        try:
            exec(compile(code, "README.md (Several machines)", "exec"), namespace)
        except Exception:
            check()  # node 1's log, if it died
            raise
        finally:
            if "llm" in namespace:
                namespace["llm"].unload()
    # vLLM's warnings go to stdout too; the answer is the last thing printed.
    printed = capsys.readouterr().out
    assert printed.endswith("\n" + native_answer(folder, "你好", 24) + "\n"), printed[-500:]


def ray_gpu_missing():
    """Why the Ray test cannot run here (None: it can)."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "vLLM's GPU build is not installed (the CPU build refuses Ray)"
    if importlib.util.find_spec("ray") is None or shutil.which("ray") is None:
        return 'Ray is not installed (pip install -e ".[vllm,ray]")'
    import torch

    if torch.cuda.device_count() < 2:
        return f"needs two GPUs, found {torch.cuda.device_count()}"
    return None


RAY_MISSING = ray_gpu_missing()


@pytest.mark.slow
@pytest.mark.skipif(RAY_MISSING is not None, reason=str(RAY_MISSING))
@pytest.mark.parametrize("split", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_ray_commands_on_two_gpus(vllm_folders, split):
    """The README's Ray commands: a head and a worker on this machine, one GPU each."""
    folder = vllm_folders["13b-tp"]
    head, worker, *servers = commands("ray start")
    ray_port = str(free_port())
    starts = []
    for gpu, (env, argv) in enumerate((head, worker)):
        assert set(env) == {"VLLM_HOST_IP"} and argv[:2] == ["ray", "start"]
        argv = [w.replace("10.0.0.1:6379", f"127.0.0.1:{ray_port}") for w in argv]
        argv = [w.replace("--port=6379", f"--port={ray_port}") for w in argv]
        local = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "CUDA_VISIBLE_DEVICES": str(gpu)}
        starts.append((argv + ["--num-gpus", "1"], local))
    (argv,) = [argv for _, argv in servers if split in argv]
    assert "--distributed-executor-backend" in argv
    port = free_port()
    argv = localize(argv, folder, {}) + TEST_FLAGS + ["--port", str(port)]
    try:
        for argv_start, env in starts:
            subprocess.run(argv_start, env=env, check=True, timeout=120)
        server = (argv, {**os.environ, "VLLM_HOST_IP": "127.0.0.1"})
        with serving(port, server, seconds=600) as url:
            answer = ask(url)
    finally:
        subprocess.run(["ray", "stop", "--force"], check=False, timeout=120)
    assert answer["choices"][0]["message"]["content"] == native_answer(folder, QUESTION, 16)
