"""LoRA adapters on the vLLM backend and ``vllm serve --enable-lora``; PEFT is the truth.

Three adapters on one tiny 7B-layout checkpoint: the official fine-tune script's kind
(``W_pack``, r=1, alpha 32), an "all linear" one saved by PEFT itself (r=8, random
non-zero B), and an MLP-only rsLoRA one. ``PeftModel`` greedy tokens and log-probs
(fp32) are what both the in-process engine and the server must give.
"""

import json
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from langchain_baichuan2 import ChatBaichuan2, CheckpointError
from langchain_baichuan2.engines import vllm as vllm_engines
from langchain_baichuan2.engines.settings import SamplingParams
from langchain_baichuan2.modeling import BaichuanForCausalLM, BaichuanTokenizer
from langchain_baichuan2.testing import make_tiny_adapter, make_tiny_checkpoint
from tests.vllm.conftest import VLLM_KWARGS, free_port, post, serve_command

peft = pytest.importorskip("peft", reason="peft (a test dependency) is not installed")

ALL_LINEAR = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTION = "What is the capital of France?"
NEW_TOKENS = 16


def peft_adapter(base, path, seed):
    """An "all linear" r=8 adapter made and saved by PEFT, with random non-zero B."""
    torch.manual_seed(seed)
    model = BaichuanForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, lora_dropout=0.1)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    model.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_checkpoint(root / "base", "7b", hidden_size=256, num_attention_heads=4)
    adapters = {
        "sql": make_tiny_adapter(base, root / "sql-lora", ["W_pack"], 1, seed=1),
        "all": peft_adapter(base, root / "all-lora", seed=2),
        "mlp": make_tiny_adapter(
            base, root / "mlp-lora", ["gate_proj", "up_proj", "down_proj"], 4, use_rslora=True
        ),
    }
    return base, {name: str(folder) for name, folder in adapters.items()}


def prompt_ids(base, question=QUESTION):
    return [195, *BaichuanTokenizer.from_pretrained(base).encode(question), 196]


def peft_greedy(base, adapter, ids, new_tokens=NEW_TOKENS):
    """``PeftModel`` (or the plain model) greedy tokens and the log-prob of each, fp32."""
    model = BaichuanForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids, tokens, logprobs = list(ids), [], []
    with torch.no_grad():
        for _ in range(new_tokens):
            scores = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            token = int(scores.argmax())
            tokens.append(token)
            logprobs.append(float(scores[token]))
            ids.append(token)
    return tokens, logprobs


@pytest.fixture(scope="module")
def truth(lora):
    base, adapters = lora
    ids = prompt_ids(base)
    return {name: peft_greedy(base, adapters.get(name), ids) for name in [None, *adapters]}


# -- the in-process engine --------------------------------------------------------------


def greedy_tokens(engine, ids, adapter):
    params = SamplingParams(max_new_tokens=NEW_TOKENS, adapter=adapter)
    return [token for chunk in engine.stream(ids, params) for token in chunk.token_ids]


@pytest.mark.slow
def test_chat_baichuan2_vllm_sends_each_calls_adapter(lora, truth):
    base, adapters = lora
    common = {"model": str(base), "temperature": 0, "max_tokens": 24, "dtype": "float32"}
    vllm = ChatBaichuan2(backend="vllm", adapters=adapters, vllm_kwargs=VLLM_KWARGS, **common)
    native = ChatBaichuan2(backend="native", adapters=adapters, **common)
    engine = vllm_engines.vllm_engine_for(
        str(base),
        revision=None,
        source="auto",
        dtype="float32",
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        vllm_kwargs=VLLM_KWARGS,
        adapters=tuple(adapters.values()),
    )
    assert engine.max_lora_rank == 8  # the largest rank, "all"'s
    # The engine's tokens are PEFT's, for each adapter and the base.
    ids = prompt_ids(base)
    for name in [None, *adapters]:
        folder = str(Path(adapters[name]).resolve()) if name else None
        expected = truth[name][0]
        assert greedy_tokens(engine, ids, folder)[: len(expected)] == expected, name
    # ChatBaichuan2 on vLLM: the same text as the native backend, per call and bound.
    texts = {}
    for name in [None, *adapters]:
        texts[name] = vllm.invoke(QUESTION, adapter=name).content
        assert texts[name] == native.invoke(QUESTION, adapter=name).content, name
    assert len(set(texts.values())) == 4  # each adapter changes the answer
    assert vllm.bind(adapter="sql").invoke(QUESTION).content == texts["sql"]
    # One stable id per adapter folder.
    ids_now = {folder: vllm_engines._adapter_id(folder) for folder in vllm_engines._adapter_ids}
    vllm.invoke(QUESTION, adapter="all")
    assert {f: vllm_engines._adapter_id(f) for f in ids_now} == ids_now
    assert len(set(ids_now.values())) == len(ids_now) == 3
    # Mixed concurrent calls (8 threads: 3 adapters and the base) equal the calls alone.
    names = [None, "sql", "all", "mlp"] * 2
    with ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(lambda name: vllm.invoke(QUESTION, adapter=name).content, names))
    assert mixed == [texts[name] for name in names]


# -- checks that start no engine ----------------------------------------------------------


def _engine_without_vllm(base, max_lora_rank, adapters=()):
    """A ``VllmEngine`` with only what ``_lora_request`` reads (vLLM is not started)."""
    engine = object.__new__(vllm_engines.VllmEngine)
    folder = vllm_engines._checked_folder(str(base), None, "auto")
    engine.folder, engine._config = folder, vllm_engines._configs[folder]
    engine.max_lora_rank, engine.adapters = max_lora_rank, frozenset(adapters)
    return engine


def test_an_adapter_asked_of_an_engine_without_lora_is_a_clear_error(lora):
    base, adapters = lora
    with pytest.raises(ValueError, match=r"started without LoRA: name it in adapters="):
        _engine_without_vllm(base, 0)._lora_request(adapters["sql"])
    with pytest.raises(ValueError, match=r"has rank 8, above this vLLM engine's max_lora_rank 1"):
        _engine_without_vllm(base, 1)._lora_request(adapters["all"])
    with pytest.raises(ValueError, match=r"started with other adapters: name it in adapters="):
        _engine_without_vllm(base, 8, [adapters["all"]])._lora_request(adapters["sql"])
    request = _engine_without_vllm(base, 8)._lora_request(adapters["sql"])
    assert (request.lora_path, request.lora_int_id) == (
        adapters["sql"],
        vllm_engines._adapter_id(adapters["sql"]),
    )


def test_lora_slots_are_sized_for_the_largest_rank_with_one_left_empty(lora):
    base, adapters = lora
    folder = vllm_engines._checked_folder(str(base), None, "auto")
    args, folders = vllm_engines._lora_engine_args(folder, (adapters["sql"],), "auto")
    # The empty slot is what rows without an adapter read in vLLM's CPU LoRA ops.
    assert args == {"enable_lora": True, "max_lora_rank": 1, "max_loras": 2}
    assert folders == (str(Path(adapters["sql"]).resolve()),)
    pair = (adapters["mlp"], adapters["sql"])
    args, _ = vllm_engines._lora_engine_args(folder, pair, "auto")
    assert args == {"enable_lora": True, "max_lora_rank": 8, "max_loras": 3}  # r=4: 8 slots
    assert vllm_engines._lora_engine_args(folder, (), "auto") == ({}, ())


def test_an_adapter_the_model_cannot_serve_fails_before_vllm_sees_it(lora, tmp_path):
    base, adapters = lora
    dora = tmp_path / "dora"
    make_tiny_adapter(base, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        _engine_without_vllm(base, 8)._lora_request(str(dora))
    folder = vllm_engines._checked_folder(str(base), None, "auto")
    with pytest.raises(CheckpointError, match="DoRA"):
        vllm_engines._lora_engine_args(folder, (str(dora),), "auto")


def test_the_plugin_model_declares_lora_as_vllms_models_do():
    from vllm.model_executor.models.interfaces import supports_lora

    from langchain_baichuan2.vllm_plugin.model import BaichuanForCausalLM as VllmBaichuan

    assert supports_lora(VllmBaichuan)
    assert VllmBaichuan.packed_modules_mapping == {
        "W_pack": ["W_pack"],  # one LoRA on the fused projection (vLLM's QKV LoRA layer)
        "gate_up_proj": ["gate_proj", "up_proj"],
    }


def test_an_adapter_folder_as_the_model_names_the_base_and_the_flags(lora):
    from vllm.config import model as model_config

    from langchain_baichuan2.vllm_plugin import register

    base, adapters = lora
    register()
    with pytest.raises(ValueError, match="is a PEFT LoRA adapter folder") as info:
        model_config.get_config(adapters["sql"], trust_remote_code=False)
    assert f"vllm serve {base} --enable-lora --lora-modules sql-lora={adapters['sql']}" in str(
        info.value
    )
    assert model_config.get_config(str(base), trust_remote_code=False).model_type == "baichuan"


# -- vllm serve --enable-lora --------------------------------------------------------------


def start_server(base, log, *flags):
    port = free_port()
    command = serve_command(base) + ["--port", str(port), "--dtype", "float32"]
    command += ["--max-model-len", "2048", "--gpu-memory-utilization", "0.04"]
    command += ["--served-model-name", "baichuan2", *flags]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_healthy(process, url, log_path):
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited: {Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                pytest.fail("vllm serve did not become healthy in 300 s")
            time.sleep(1)


@pytest.fixture(scope="module")
def lora_server(lora, tmp_path_factory):
    base, adapters = lora
    modules = [f"{name}={folder}" for name, folder in adapters.items()]
    # One slot more than adapters: on vLLM's CPU build (0.32) rows without an adapter
    # read the last slot, so it must stay empty.
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        process, url = start_server(
            base,
            log,
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--max-loras",
            "4",
            "--lora-modules",
            *modules,
        )
        try:
            wait_healthy(process, url, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.mark.slow
def test_served_adapters_answer_as_peft_and_chat_openai_gets_them(lora, truth, lora_server):
    from langchain_openai import ChatOpenAI

    base, adapters = lora
    url = lora_server
    ids = prompt_ids(base)
    for name in [None, *adapters]:
        answer = post(
            f"{url}/v1/completions",
            {
                "model": name or "baichuan2",
                "prompt": ids,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "logprobs": 1,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            },
        )
        got = answer["choices"][0]["logprobs"]
        tokens = [int(token.removeprefix("token_id:")) for token in got["tokens"]]
        expected_tokens, expected_logprobs = truth[name]
        assert tokens == expected_tokens, name
        delta = max(
            abs(a - b) for a, b in zip(got["token_logprobs"], expected_logprobs, strict=True)
        )
        assert delta <= 1e-4, (name, delta)
    native = ChatBaichuan2(
        model=str(base), adapters=adapters, temperature=0, max_tokens=16, dtype="float32"
    )
    replies = {}
    for name in [None, *adapters]:
        server = ChatOpenAI(
            base_url=f"{url}/v1",
            api_key="none",
            model=name or "baichuan2",
            temperature=0,
            max_tokens=16,
        )
        replies[name] = server.invoke(QUESTION).content
        assert replies[name] == native.invoke(QUESTION, adapter=name).content, name
    assert len(set(replies.values())) == 4


@pytest.mark.slow
def test_a_server_without_enable_lora_refuses_an_adapter_by_name(lora, tmp_path):
    base, adapters = lora
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process, url = start_server(base, log)
        try:
            wait_healthy(process, url, log_path)
            body = {"model": "sql", "messages": [{"role": "user", "content": "Hi"}]}
            with pytest.raises(urllib.error.HTTPError) as info:
                post(f"{url}/v1/chat/completions", {**body, "max_tokens": 1})
            assert info.value.code == 404
            message = json.loads(info.value.read())["error"]["message"]
            assert "The model `sql` does not exist" in message
            assert "baichuan2" in message  # the names it does serve
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    # --lora-modules without --enable-lora: the server does not start, and says why.
    log_path = tmp_path / "serve2.log"
    with open(log_path, "w") as log:
        process, url = start_server(base, log, "--lora-modules", f"sql={adapters['sql']}")
        assert process.wait(300) != 0
    assert "LoRA is not enabled. Use --enable-lora" in log_path.read_text()
