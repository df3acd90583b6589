"""Tool calls and structured output on random weights: valid by construction."""

import asyncio
import json
from typing import Literal

import pydantic.v1 as pydantic_v1
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import BaseModel
from typing_extensions import TypedDict

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.engines.native import NativeEngine, engine_for
from langchain_baichuan2.testing import make_tiny_checkpoint
from langchain_baichuan2.tools import Constraint, format_tools

from .tiny import picked_tokens


class Address(BaseModel):
    street: str
    zip_code: int | None = None


class Person(BaseModel):
    """Register a person (nested object, array, optional field)."""

    name: str
    address: Address
    tags: list[str]


class Order(BaseModel):
    """Order a pizza (enums)."""

    size: Literal["S", "M", "L"]
    quantity: int
    toppings: list[Literal["cheese", "ham", "olive"]]


def ping() -> str:
    """Check the service (no arguments)."""
    return "pong"


VALIDATORS = {"Person": Person.model_validate, "Order": Order.model_validate, "ping": dict}


def sampling_llm(folder):
    return ChatBaichuan2(
        model=str(folder),
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_tokens=300,
        grammar_max_length=6,
    )


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return sampling_llm(tiny_checkpoint)


async def test_forced_calls_always_parse_and_validate_against_their_schema(tiny_7b):
    bound = sampling_llm(tiny_7b).bind_tools([Person, Order, ping], tool_choice="any")
    replies = await asyncio.gather(*(bound.ainvoke(f"Request {i}", seed=i) for i in range(100)))
    names = set()
    for reply in replies:
        assert reply.response_metadata["finish_reason"] == "tool_calls"
        assert not reply.invalid_tool_calls
        (call,) = reply.tool_calls
        VALIDATORS[call["name"]](call["args"])
        if call["name"] == "ping":
            assert call["args"] == {}
        names.add(call["name"])
    assert len(names) >= 2  # sampling reaches more than one tool


@pytest.mark.parametrize(
    "choice",
    ["Order", {"type": "function", "function": {"name": "Order"}}],
)
def test_a_named_tool_choice_forces_that_tool(llm, choice):
    reply = llm.bind_tools([Person, Order, ping], tool_choice=choice).invoke("hi", seed=3)
    assert [c["name"] for c in reply.tool_calls] == ["Order"]
    Order.model_validate(reply.tool_calls[0]["args"])


def test_tool_choice_none_gives_text_only(tiny_7b):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=20)
    reply = llm.bind_tools([ping], tool_choice="none").invoke("hi")
    assert reply.tool_calls == [] and reply.response_metadata["finish_reason"] != "tool_calls"
    assert reply.content == llm.invoke("hi").content  # nothing was added to the prompt


def test_streaming_yields_tool_call_chunks(llm):
    bound = llm.bind_tools([Order], tool_choice="any")
    chunks = list(bound.stream("pizza", seed=5))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.tool_call_chunks and merged.tool_call_chunks[0]["name"] == "Order"
    assert merged.response_metadata["finish_reason"] == "tool_calls"
    assert merged.tool_calls[0]["args"] == bound.invoke("pizza", seed=5).tool_calls[0]["args"]
    assert "<tool_call>" not in merged.content


def test_a_call_cut_by_max_tokens_becomes_an_invalid_tool_call(tiny_7b, monkeypatch):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=200)
    tokenizer = llm.loaded_model().tokenizer
    text = 'ok <tool_call>{"name": "Order", "arguments": {"size": "M", '
    script = tokenizer.encode(text, add_special_tokens=False)
    steps = iter(script * 2)

    def scripted_pick(self, logits, rows, *args):
        return picked_tokens(next(steps), len(rows))

    monkeypatch.setattr(NativeEngine, "_pick", scripted_pick)
    reply = llm.bind_tools([Order]).invoke("hi", max_tokens=len(script))
    assert reply.content == "ok "
    assert reply.tool_calls == []
    assert reply.invalid_tool_calls[0]["name"] == "Order"
    assert reply.invalid_tool_calls[0]["error"] == "unterminated tool call"
    assert reply.response_metadata["finish_reason"] == "length"
    merged = None
    for chunk in llm.bind_tools([Order]).stream("hi", max_tokens=len(script)):
        merged = chunk if merged is None else merged + chunk
    assert merged.tool_calls == []  # merging chunks does not "repair" the cut call


def test_a_token_the_grammar_rejects_fails_only_that_request(tiny_7b, monkeypatch):
    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=20)
    bad = llm.loaded_model().tokenizer.encode("x", add_special_tokens=False)[0]
    monkeypatch.setattr(
        NativeEngine, "_pick", lambda self, logits, rows, *a: picked_tokens(bad, len(rows))
    )
    with pytest.raises(RuntimeError, match="grammar rejected token"):
        llm.bind_tools([Order], tool_choice="any").invoke("hi")
    monkeypatch.undo()
    assert llm.invoke("hi").usage_metadata["output_tokens"] >= 1


def test_auto_choice_gives_text_or_valid_calls(llm):
    bound = llm.bind_tools([Order, ping])
    for seed in range(5):
        reply = bound.invoke("hello", seed=seed)
        for call in reply.tool_calls:
            VALIDATORS[call["name"]](call["args"])


def test_tool_histories_are_accepted(llm):
    call = {"name": "ping", "args": {}, "id": "call_1", "type": "tool_call"}
    history = [
        HumanMessage("Is the service up?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("pong", tool_call_id="call_1", name="ping"),
        ToolMessage("timeout", tool_call_id="call_2", status="error"),
    ]
    reply = llm.bind_tools([ping]).invoke(history, seed=1)
    assert isinstance(reply, AIMessage)


class Joke(BaseModel):
    setup: str
    punchline: str
    rating: int | None = None


class JokeV1(pydantic_v1.BaseModel):
    setup: str
    punchline: str


class JokeDict(TypedDict):
    setup: str
    punchline: str


JOKE_SCHEMA = {
    "title": "Joke",
    "type": "object",
    "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
    "required": ["setup", "punchline"],
}


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
@pytest.mark.parametrize(
    "schema", [Joke, JokeV1, JokeDict, JOKE_SCHEMA], ids=["v2", "v1", "td", "js"]
)
def test_structured_output_returns_a_valid_instance(llm, method, schema):
    result = llm.with_structured_output(schema, method=method).invoke("Tell a joke", seed=2)
    if isinstance(schema, type) and issubclass(schema, (BaseModel, pydantic_v1.BaseModel)):
        assert isinstance(result, schema)
    else:
        assert set(result) == {"setup", "punchline"}
        assert all(isinstance(v, str) for v in result.values())


def test_structured_output_include_raw(llm):
    out = llm.with_structured_output(Joke, include_raw=True).invoke("Tell a joke", seed=4)
    assert isinstance(out["raw"], AIMessage)
    assert isinstance(out["parsed"], Joke)
    assert out["parsing_error"] is None
    assert Joke.model_validate(json.loads(out["raw"].content)) == out["parsed"]


def test_json_mode_without_schema_allows_objects_only(llm):
    import xgrammar as xgr

    grammar = engine_for(llm.loaded_model()).grammar_compiler.compile(Constraint("json"))
    assert xgr.GrammarMatcher(grammar).accept_string('{"a": [1, "x"]}')
    for not_an_object in ("[1]", '"text"', "3"):
        assert not xgr.GrammarMatcher(grammar).accept_string(not_an_object)


def test_bad_structured_output_arguments_are_rejected(llm):
    with pytest.raises(ValueError, match="method must be"):
        llm.with_structured_output(Joke, method="xml")
    with pytest.raises(ValueError, match="needs a schema"):
        llm.with_structured_output(None)


def test_grammars_are_compiled_once_per_schema_set(llm):
    engine = engine_for(llm.loaded_model())
    compiler = engine.grammar_compiler
    assert compiler is engine.grammar_compiler
    tools = tuple(format_tools([Order, ping]))
    required, auto = (
        Constraint("tools", tools=tools, choice="required"),
        Constraint("tools", tools=tools, choice="auto"),
    )
    same = Constraint("tools", tools=tools, choice="required")
    assert compiler.compile(required) is compiler.compile(same)
    assert compiler.compile(required) is not compiler.compile(auto)


def test_forced_calls_work_with_the_real_vocabulary(real_tokenizer_model, tmp_path_factory):
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("real-vocab"), "7b", tokenizer_model=real_tokenizer_model
    )
    llm = ChatBaichuan2(
        model=str(folder), temperature=1.0, top_k=0, max_tokens=300, grammar_max_length=6
    )
    assert llm.loaded_model().model.config.vocab_size == 125696
    bound = llm.bind_tools([Person, Order, ping], tool_choice="required")
    for seed in range(5):
        (call,) = bound.invoke("你好", seed=seed).tool_calls
        VALIDATORS[call["name"]](call["args"])


def test_a_forced_call_cut_before_its_tag_is_an_invalid_call(tiny_7b):
    class Point(BaseModel):
        x: int

    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=3)
    structured = llm.with_structured_output(Point, method="function_calling", include_raw=True)
    out = structured.invoke("Where?")
    raw = out["raw"]
    assert raw.content == ""
    assert raw.tool_calls == []
    (cut,) = raw.invalid_tool_calls
    assert "<tool_call>".startswith(cut["args"]) and cut["args"]
    assert "cut off" in cut["error"]
    assert out["parsed"] is None
    assert "invalid" in str(out["parsing_error"])


def test_the_grammar_cache_is_bounded_and_keeps_the_recent_ones(llm):
    compiler = engine_for(llm.loaded_model()).grammar_compiler
    schemas = [
        Constraint("json", schema={"type": "object", "properties": {f"k{i}": {"type": "integer"}}})
        for i in range(compiler.CACHE_SIZE + 6)
    ]
    compiled = [compiler.compile(schema) for schema in schemas]
    assert len(compiler._cache) == compiler.CACHE_SIZE
    assert compiler.compile(schemas[-1]) is compiled[-1]
    assert compiler.compile(schemas[0]) is not compiled[0]  # evicted, compiled again


def test_building_shared_services_never_waits_for_a_forward_pass(tiny_7b):
    import threading

    llm = ChatBaichuan2(model=str(tiny_7b), temperature=0, max_tokens=4)
    llm.unload()
    loaded = llm.loaded_model()  # a fresh engine and grammar compiler must be built below
    built = threading.Event()
    with loaded.lock:  # as the worker holds it during a forward pass
        thread = threading.Thread(target=lambda: (engine_for(loaded).grammar_compiler, built.set()))
        thread.start()
        assert built.wait(10), "building the grammar compiler waited for the model lock"
    thread.join()
