"""The RAG example's pipeline (examples/rag.py) on a tiny checkpoint."""

import importlib.util
from pathlib import Path

import pytest

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.embeddings import Baichuan2Embeddings

pytest.importorskip("faiss", reason='faiss-cpu is not installed (pip install ".[rag]")')

RAG_FILE = Path(__file__).resolve().parents[2] / "examples" / "rag.py"


@pytest.fixture(scope="module")
def rag():
    spec = importlib.util.spec_from_file_location("rag_example", RAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llm(tiny_7b):
    return ChatBaichuan2(
        model=str(tiny_7b), temperature=0, max_tokens=8, model_kwargs={"min_new_tokens": 1}
    )


@pytest.fixture(scope="module")
def store(rag, llm):
    return rag.build_index(Baichuan2Embeddings.from_chat_model(llm), rag.load_documents())


def test_bundled_documents_are_chinese_and_english(rag):
    docs = rag.load_documents()
    assert len(docs) >= 10
    assert {d.metadata["lang"] for d in docs} == {"zh", "en"}


def test_an_exact_copy_of_a_document_retrieves_it_first(rag, store):
    retriever = store.as_retriever(search_kwargs={"k": 3})
    for doc in rag.load_documents()[::2]:
        hits = retriever.invoke(doc.page_content)
        assert hits[0].id == doc.id
        assert len(hits) == 3


def test_scores_are_cosines_with_the_copy_at_one(rag, store):
    doc = rag.load_documents()[0]
    (best, score), *_ = store.similarity_search_with_score(doc.page_content, k=2)
    assert best.id == doc.id
    assert score == pytest.approx(1.0, abs=1e-4)


def test_the_chain_streams_a_non_empty_answer(rag, store, llm):
    chain = rag.build_chain(store.as_retriever(search_kwargs={"k": 2}), llm)
    pieces = list(chain.stream("“温故而知新”是什么意思？"))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces)


async def test_the_chain_runs_async(rag, store, llm):
    chain = rag.build_chain(store.as_retriever(search_kwargs={"k": 2}), llm)
    assert await chain.ainvoke("What is retrieval-augmented generation?")


def test_the_context_names_each_retrieved_source(rag):
    docs = rag.load_documents()[:2]
    context = rag.format_docs(docs)
    assert all(f"[{d.id}] {d.page_content}" in context for d in docs)
