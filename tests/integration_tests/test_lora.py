"""LoRA adapters on the native engine, against PEFT itself (the truth)."""

import copy
import json
import threading
from pathlib import Path

import pytest
import torch
from langchain_core.messages import HumanMessage
from safetensors.torch import save_file

from langchain_baichuan2 import Baichuan2Embeddings, ChatBaichuan2, CheckpointError
from langchain_baichuan2.engines.native.slot_model import SlotModel
from langchain_baichuan2.loading import load_model_and_tokenizer
from langchain_baichuan2.loading.adapters import read_adapter
from langchain_baichuan2.testing import make_tiny_adapter, make_tiny_checkpoint

peft = pytest.importorskip("peft")

ALL_LINEAR = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
# The official fine-tune script's adapter (W_pack, r=1, alpha 32) and an all-linear one.
KINDS = {
    "w_pack": {"target_modules": ("W_pack",), "r": 1},
    "all_linear": {"target_modules": ALL_LINEAR, "r": 4, "use_rslora": True, "lora_alpha": 16},
}
NEW = 10
CALL = {
    "temperature": 0,
    "max_tokens": NEW,
    "repetition_penalty": 1.0,
    "model_kwargs": {"min_new_tokens": NEW},
}


@pytest.fixture(scope="module", params=["7b", "13b"])
def tiny(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(f"lora-{request.param}"), request.param)


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    made = {
        name: make_tiny_adapter(tiny, root / name, seed=i, **kind)
        for i, (name, kind) in enumerate(KINDS.items())
    }
    made["bin"] = make_tiny_adapter(tiny, root / "bin", ALL_LINEAR, 2, weights="bin", seed=7)
    return made


def peft_model(tiny, folder):
    base = load_model_and_tokenizer(tiny, dtype="float32").model
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def peft_greedy(model, prompt_ids):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=2,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def native_tokens(llm, text, **kwargs):
    """Prompt ids and greedy tokens of one call through ChatBaichuan2's own path."""
    call = llm._prepare([HumanMessage(text)], None, {**CALL, **kwargs})
    ids = []
    for chunk in call.engine.stream(call.prompt.input_ids, call.params):
        ids += chunk.token_ids
    return call, ids


def test_make_tiny_adapter_writes_what_peft_loads(tiny, adapters):
    """PEFT reads every tensor under its own names; the adapter changes the output."""
    model = peft_model(tiny, adapters["all_linear"])
    layer = model.base_model.model.model.layers[1]
    stored = read_adapter(adapters["all_linear"], model.config)
    a, b = stored.weights[1, "down_proj"]
    assert torch.equal(layer.mlp.down_proj.lora_A["default"].weight, a)
    assert torch.equal(layer.mlp.down_proj.lora_B["default"].weight, b)
    config = json.loads((adapters["w_pack"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["W_pack"]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(ids).logits
        assert (model(ids).logits - plain).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["w_pack", "all_linear", "bin"])
def test_greedy_tokens_equal_peft(tiny, adapters, kind):
    llm = ChatBaichuan2(model=str(tiny), dtype="float32", adapters={"a": str(adapters[kind])})
    call, tokens = native_tokens(llm, "Hello there", adapter="a")
    assert call.params.adapter == str(adapters[kind].resolve())
    assert tokens == peft_greedy(peft_model(tiny, adapters[kind]), call.prompt.input_ids)
    _, base = native_tokens(llm, "Hello there")
    assert base != tokens  # the adapter matters here


def test_logits_of_mixed_rows_equal_peft_full_forwards(tiny, adapters):
    """One decode batch: two adapters and a base row; each row's logits = PEFT's (fp32)."""
    base = load_model_and_tokenizer(tiny, dtype="float32").model
    slots = SlotModel(base)
    names = ["w_pack", None, "all_linear"]
    index = [
        0 if n is None else slots.add_adapter(read_adapter(adapters[n], base.config)) for n in names
    ]
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23]]
    truths = []
    for name, prompt in zip(names, prompts, strict=True):
        model = base if name is None else peft_model(tiny, adapters[name])
        with torch.no_grad():
            truths.append(model(torch.tensor([prompt + [30, 31]])).logits[0])
    for slot, (prompt, adapter) in enumerate(zip(prompts, index, strict=True)):
        slots.cache.acquire(64)
        first = slots.prefill(slot, prompt, 0, adapter)
        assert (first[0] - truths[slot][len(prompt) - 1]).abs().max() <= 1e-4
    lengths = torch.tensor([len(p) for p in prompts])
    for step, token in enumerate((30, 31)):
        logits = slots.decode(
            [0, 1, 2],
            int(lengths.max()) + step + 1,
            torch.tensor([0, 1, 2]),
            torch.tensor([token] * 3),
            lengths + step,
            torch.tensor(index),
        )
        for row in range(3):
            want = truths[row][len(prompts[row]) + step]
            assert (logits[row] - want).abs().max() <= 1e-4


def test_a_batch_without_adapters_runs_the_plain_path(tiny, adapters, monkeypatch):
    """Base rows never touch the LoRA code, even with adapters loaded."""
    from langchain_baichuan2.modeling import lora

    llm = ChatBaichuan2(model=str(tiny), dtype="float32", adapters={"a": str(adapters["w_pack"])})
    native_tokens(llm, "warm", adapter="a")

    def forbidden(*args, **kwargs):
        raise AssertionError("LoRA code ran for base rows")

    monkeypatch.setattr(lora.LoraRows, "add", forbidden)
    native_tokens(llm, "only base rows")


def test_merged_adapter_equals_peft(tiny, adapters):
    folder = adapters["all_linear"]
    merged = ChatBaichuan2(
        model=str(tiny), dtype="float32", adapter=str(folder), merge_adapter=True
    )
    call, tokens = native_tokens(merged, "Hello there")
    assert call.params.adapter is None  # in the weights, not per row
    truth = peft_model(tiny, folder)
    assert tokens == peft_greedy(truth, call.prompt.input_ids)
    ids = torch.tensor([call.prompt.input_ids])
    with torch.no_grad():
        delta = merged.loaded_model().model(ids).logits - truth(ids).logits
    assert delta.abs().max() <= 1e-4
    plain = ChatBaichuan2(model=str(tiny), dtype="float32")
    assert plain.loaded_model() is not merged.loaded_model()
    merged.unload()


def test_mixed_concurrent_calls_each_equal_the_call_alone(tiny, adapters, tmp_path):
    third = make_tiny_adapter(tiny, tmp_path / "third", ("o_proj", "up_proj"), 3, seed=11)
    named = {"one": adapters["w_pack"], "two": adapters["all_linear"], "three": third}
    llm = ChatBaichuan2(
        model=str(tiny), dtype="float32", adapters={k: str(v) for k, v in named.items()}
    )
    jobs = [(f"question {i}", [None, "one", "two", "three"][i % 4]) for i in range(8)]
    alone = {job: native_tokens(llm, job[0], adapter=job[1])[1] for job in jobs}
    results = {}

    def run(job):
        results[job] = native_tokens(llm, job[0], adapter=job[1])[1]

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == alone
    assert len({tuple(v) for v in alone.values()}) > 4


def test_surface_forms_choose_the_same_adapter(tiny, adapters):
    folder = str(adapters["w_pack"])
    named = ChatBaichuan2(
        model=str(tiny), dtype="float32", temperature=0, max_tokens=6, adapters={"sql": folder}
    )
    per_call = named.invoke("hi", adapter="sql").content
    assert named.bind(adapter="sql").invoke("hi").content == per_call
    assert (
        ChatBaichuan2(model=str(tiny), dtype="float32", temperature=0, max_tokens=6, adapter=folder)
        .invoke("hi")
        .content
        == per_call
    )
    from_folder = ChatBaichuan2(model=folder, dtype="float32", temperature=0, max_tokens=6)
    assert from_folder.model == str(tiny) and from_folder.adapter == folder
    assert from_folder.invoke("hi").content == per_call


def test_an_unknown_adapter_name_lists_the_known_ones(tiny, adapters):
    llm = ChatBaichuan2(model=str(tiny), adapters={"sql": str(adapters["w_pack"])})
    with pytest.raises(ValueError, match="Unknown adapter 'law'.*'sql'"):
        llm.invoke("hi", adapter="law")
    with pytest.raises(ValueError, match="Unknown adapter 'law'"):
        llm.bind(adapter="law")
    with pytest.raises(ValueError, match="Unknown adapter"):
        ChatBaichuan2(model=str(tiny), adapter="law")


def test_adapters_are_shared_and_unload_frees_them(tiny, adapters):
    folder = str(adapters["w_pack"])
    one = ChatBaichuan2(model=str(tiny), dtype="float32", adapters={"x": folder})
    two = ChatBaichuan2(model=str(tiny), dtype="float32", adapter=folder)
    native_tokens(one, "a", adapter="x")
    native_tokens(two, "b")
    engine = one.engine()
    names = [adapter.name for adapter in engine.slot_model.lora.adapters]
    assert names.count(str(Path(folder).resolve())) == 1  # read and stacked once
    loaded = one.loaded_model()
    assert one.unload()
    assert loaded._shared == {}
    native_tokens(two, "c")  # loads again on use


def _refused(tiny, tmp_path, name, edit):
    folder = make_tiny_adapter(tiny, tmp_path / name, ALL_LINEAR, 2)
    edit(folder)
    return folder


def _config_edit(**changes):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _tensors_edit(change):
    def edit(folder):
        from safetensors.torch import load_file

        tensors = load_file(folder / "adapter_model.safetensors")
        change(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")

    return edit


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def _pickle(folder):
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": _Evil()}, folder / "adapter_model.bin")


REFUSALS = {
    "dora": (_config_edit(use_dora=True), "DoRA"),
    "modules_to_save": (_config_edit(modules_to_save=["lm_head"]), "modules_to_save"),
    "unknown_module": (_config_edit(target_modules=["q_proj", "W_pack"]), "unknown target.*q_proj"),
    "embed_tokens": (
        _tensors_edit(
            lambda t: t.update({"base_model.model.model.embed_tokens.lora_A.weight": torch.ones(2)})
        ),
        "embed_tokens or lm_head",
    ),
    "non_float": (
        _tensors_edit(
            lambda t: t.update(
                {k: torch.ones_like(v, dtype=torch.int32) for k, v in list(t.items())[:1]}
            )
        ),
        "not floating point",
    ),
    "no_weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "No adapter weights"),
    "no_config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "pickle": (_pickle, "safely"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_adapters_name_the_problem_and_the_base_keeps_serving(tiny, tmp_path, case):
    edit, message = REFUSALS[case]
    folder = _refused(tiny, tmp_path, case, edit)
    llm = ChatBaichuan2(
        model=str(tiny), dtype="float32", temperature=0, max_tokens=4, adapters={"bad": str(folder)}
    )
    with pytest.raises(CheckpointError, match=message):
        llm.invoke("hi", adapter="bad")
    assert isinstance(llm.invoke("hi").content, str)


def test_an_adapter_for_a_bigger_model_is_refused(tiny, tmp_path):
    big = make_tiny_checkpoint(tmp_path / "big", hidden_size=96, num_attention_heads=4)
    folder = make_tiny_adapter(big, tmp_path / "big-lora", ("W_pack",), 1)
    llm = ChatBaichuan2(model=str(tiny), dtype="float32", max_tokens=4, adapter=str(folder))
    with pytest.raises(CheckpointError, match="another model"):
        llm.invoke("hi")
    assert isinstance(llm.invoke("hi", adapter=None).content, str)


def test_embeddings_with_an_adapter_pool_peft_hidden_states(tiny, adapters):
    folder = adapters["all_linear"]
    emb = Baichuan2Embeddings(model=str(tiny), dtype="float32", adapter=str(folder))
    plain = Baichuan2Embeddings(model=str(tiny), dtype="float32")
    vector = torch.tensor(emb.embed_query("hello world"))
    assert (vector - torch.tensor(plain.embed_query("hello world"))).abs().max() > 1e-3
    truth = peft_model(tiny, folder)
    ids = emb._tokenize(emb.loaded_model(), ["hello world"])[0]
    with torch.no_grad():
        hidden = truth.base_model.model.model(torch.tensor([ids])).last_hidden_state[0]
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
    assert (vector - expected).abs().max() <= 1e-5


def test_the_adapter_folder_names_its_base(tiny, adapters):
    assert read_adapter(
        adapters["w_pack"], load_model_and_tokenizer(tiny).model.config
    ).base_model_name_or_path == str(tiny)
    assert Path(ChatBaichuan2(model=str(adapters["w_pack"])).model) == tiny


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_lora_on_quantized_weights_equals_peft_on_them(tiny, adapters, quantization):
    """QLoRA: the adapter in floating point on bitsandbytes weights, as PEFT does."""
    folder = adapters["all_linear"]
    llm = ChatBaichuan2(model=str(tiny), quantization=quantization, adapter=str(folder))
    call, tokens = native_tokens(llm, "Hello there")
    base = load_model_and_tokenizer(tiny, quantization=quantization).model
    truth = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    assert tokens == peft_greedy(truth, call.prompt.input_ids)
    llm.unload()


def test_merging_into_quantized_weights_is_refused(tiny, adapters):
    llm = ChatBaichuan2(
        model=str(tiny), quantization="8bit", adapter=str(adapters["w_pack"]), merge_adapter=True
    )
    with pytest.raises(ValueError, match="Cannot merge adapter .* quantized"):
        llm.invoke("hi")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_equals_peft(tiny, adapters, dtype):
    folder = adapters["all_linear"]
    llm = ChatBaichuan2(model=str(tiny), dtype=dtype, adapter=str(folder))
    call, tokens = native_tokens(llm, "Hello there")
    base = load_model_and_tokenizer(tiny, dtype=dtype).model
    truth = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    assert tokens == peft_greedy(truth, call.prompt.input_ids)
    llm.unload()
