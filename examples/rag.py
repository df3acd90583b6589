"""RAG with one Baichuan2 model: it embeds the documents and writes the answer.

Bundled Chinese and English documents are embedded with ``Baichuan2Embeddings``
(sharing the chat model's weights), indexed in a local FAISS index, retrieved for a
question, and answered by ``ChatBaichuan2`` through an LCEL chain, streamed.

pip install -e ".[rag]"      # from a clone; adds faiss-cpu
python examples/rag.py                                   # baichuan-inc/Baichuan2-7B-Chat
python examples/rag.py --question "What is retrieval-augmented generation?"
python examples/rag.py --model /path/to/Baichuan2-13B-Chat --quantization 4bit
python examples/rag.py --demo                            # offline, tiny random checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnablePassthrough
from langchain_core.vectorstores import VectorStore

from langchain_baichuan2 import ChatBaichuan2
from langchain_baichuan2.embeddings import Baichuan2Embeddings

DOCS_FILE = Path(__file__).resolve().parent / "data" / "docs.json"
QUESTION = "“温故而知新”是什么意思？"
PROMPT = ChatPromptTemplate.from_messages(
    [
        (
            "system",
            "请只根据给出的资料回答问题；资料中没有答案时请直说。"
            "Answer only from the given context; say so when it does not contain the answer.",
        ),
        ("human", "资料 / Context:\n{context}\n\n问题 / Question: {question}"),
    ]
)


class FaissVectorStore(VectorStore):
    """A small local vector store: documents in a list, vectors in a flat FAISS index.

    Vectors are L2-normalized, so the inner-product index ranks by cosine similarity.
    """

    def __init__(self, embedding: Embeddings) -> None:
        try:
            import faiss
        except ImportError as e:
            msg = 'FAISS is not installed: pip install -e ".[rag]" (in a clone of this package)'
            raise ImportError(msg) from e
        self._faiss = faiss
        self._embedding = embedding
        self._index: Any = None  # created on the first add, when the width is known
        self._docs: list[Document] = []

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        texts = list(texts)
        metadatas = metadatas or [{} for _ in texts]
        ids = ids or [str(uuid.uuid4()) for _ in texts]
        vectors = np.asarray(self._embedding.embed_documents(texts), dtype=np.float32)
        self._faiss.normalize_L2(vectors)
        if self._index is None:
            self._index = self._faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(vectors)
        self._docs += [
            Document(id=i, page_content=t, metadata=m)
            for i, t, m in zip(ids, texts, metadatas, strict=True)
        ]
        return ids

    def similarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        if not self._docs:
            return []
        vector = np.asarray([self._embedding.embed_query(query)], dtype=np.float32)
        self._faiss.normalize_L2(vector)
        scores, rows = self._index.search(vector, min(k, len(self._docs)))
        return [(self._docs[r], float(s)) for r, s in zip(rows[0], scores[0], strict=True)]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda cosine: (cosine + 1) / 2

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> FaissVectorStore:
        store = cls(embedding)
        store.add_texts(texts, metadatas, ids=ids)
        return store


def load_documents(path: Path = DOCS_FILE) -> list[Document]:
    """Read the bundled documents (a JSON list of ``{id, lang, text}``)."""
    return [
        Document(
            id=d["id"], page_content=d["text"], metadata={"source": d["id"], "lang": d["lang"]}
        )
        for d in json.loads(path.read_text(encoding="utf-8"))
    ]


def build_index(embeddings: Embeddings, docs: list[Document]) -> FaissVectorStore:
    """Embed ``docs`` and index them in a new FAISS store."""
    store = FaissVectorStore(embeddings)
    store.add_documents(docs)
    return store


def format_docs(docs: list[Document]) -> str:
    """Join retrieved documents into the prompt's context, each tagged with its source."""
    return "\n\n".join(f"[{d.metadata['source']}] {d.page_content}" for d in docs)


def build_chain(retriever: BaseRetriever, llm: BaseChatModel) -> Runnable[str, str]:
    """Question in, answer text out: retrieve, fill the prompt, generate, parse."""
    return (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | PROMPT
        | llm
        | StrOutputParser()
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line, with a help text for every option."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="baichuan-inc/Baichuan2-7B-Chat",
        help="a local model folder or a model id (default: %(default)s)",
    )
    parser.add_argument(
        "--quantization",
        choices=["4bit", "8bit"],
        default=None,
        help="quantize the weights at load with bitsandbytes (default: none)",
    )
    parser.add_argument("--question", default=QUESTION, help="what to ask (default: %(default)s)")
    parser.add_argument(
        "--k", type=int, default=3, help="documents to retrieve (default: %(default)s)"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run offline on a tiny random checkpoint in a temporary folder, removed "
        "afterwards (retrieval ranks and the answer are random); --model is then ignored",
    )
    return parser


def run(args: argparse.Namespace, model: str, demo: bool = False) -> None:
    """Index the bundled documents, retrieve for the question, stream the answer."""
    # The random demo model rarely ends on its own and may end at once: bound it both ways.
    max_tokens, extra = (48, {"min_new_tokens": 1}) if demo else (512, {})
    llm = ChatBaichuan2(
        model=model,
        quantization=args.quantization,
        temperature=0,
        max_tokens=max_tokens,
        model_kwargs=extra,
    )
    embeddings = Baichuan2Embeddings.from_chat_model(llm)  # the same weights, loaded once
    store = build_index(embeddings, load_documents())
    retriever = store.as_retriever(search_kwargs={"k": args.k})

    print(f"问题 / Question: {args.question}")
    hits = store.similarity_search_with_score(args.question, k=args.k)
    print("检索 / Retrieved: " + ", ".join(f"{d.id} ({score:.3f})" for d, score in hits))
    print("回答 / Answer: ", end="", flush=True)
    for piece in build_chain(retriever, llm).stream(args.question):
        print(piece, end="", flush=True)
    print()


def main() -> None:
    args = build_parser().parse_args()
    if not args.demo:
        run(args, args.model)
        return
    from langchain_baichuan2.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="baichuan2-demo-") as folder:
        print("(demo: random weights, so retrieval ranks and the answer are random text)")
        run(args, str(make_tiny_checkpoint(folder)), demo=True)


if __name__ == "__main__":
    from langchain_baichuan2 import CheckpointError, DownloadError

    try:
        main()
    except (DownloadError, CheckpointError) as e:  # what to do, in one message
        sys.exit(f"error: {e}")
