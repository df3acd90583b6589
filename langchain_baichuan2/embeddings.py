"""Baichuan2Embeddings: text embeddings pooled from a local Baichuan2 model's hidden states."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

import torch
from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm
from transformers import BitsAndBytesConfig

from langchain_baichuan2 import engines
from langchain_baichuan2.arguments import reject_unknown_arguments
from langchain_baichuan2.engines.native.budget import EMBEDDING_FORWARD_TOKENS
from langchain_baichuan2.engines.native.cpu_layout import free_openmp_threads
from langchain_baichuan2.loading import LOAD_SETTINGS, LoadedModel, progress_enabled
from langchain_baichuan2.loading.adapters import resolve_adapter_path
from langchain_baichuan2.loading.registry import shared_adapter
from langchain_baichuan2.modeling import lora
from langchain_baichuan2.prompt import eos_token_ids, literal_text_encoder

if TYPE_CHECKING:
    from langchain_baichuan2.chat_models import ChatBaichuan2

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "last", "weighted_mean"]

# The fields an embeddings object takes over from a chat model (see from_chat_model).
_MODEL_FIELDS = ("model", *LOAD_SETTINGS, "show_progress", "parse_special_tokens")


def _check_texts(texts: Sequence[Any]) -> list[str]:
    """Return ``texts`` as a list, raising ``TypeError`` on the first item that is not a str.

    A single string is rejected too: as a sequence it would embed each character.
    """
    if isinstance(texts, str):
        msg = f"texts must be a list of strings, got the string {texts!r:.60}; use [text]"
        raise TypeError(msg)
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            msg = f"texts[{index}] must be a str, got {type(text).__name__}: {text!r:.60}"
            raise TypeError(msg)
    return texts


def _right_padded(
    batch_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token id lists into right-padded ``input_ids`` and ``attention_mask`` tensors."""
    lengths = torch.tensor([len(ids) for ids in batch_ids])
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # [batch, seq]
    input_ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    # Row-major boolean indexing visits each row's real tokens in order.
    input_ids[mask] = torch.tensor(list(chain.from_iterable(batch_ids)), dtype=torch.long)
    return input_ids.to(device), mask.long().to(device)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length, cut into batches for one forward each.

    A batch holds at most ``batch_size`` texts and, padded to its longest, at most
    ``budget.EMBEDDING_FORWARD_TOKENS`` tokens (the memory the native engine sets aside
    for it), or one text.
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        batch = batches[-1] if batches else []
        # Sorted: the newcomer is the batch's longest text.
        if (
            batch
            and len(batch) < batch_size
            and (len(batch) + 1) * lengths[i] <= (EMBEDDING_FORWARD_TOKENS)
        ):
            batch.append(i)
        else:
            batches.append([i])
    return batches


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool right-padded hidden states ``[batch, seq, hidden]`` into ``[batch, hidden]`` fp32.

    Args:
        hidden: Hidden states; rows are right-padded.
        mask: Attention mask ``[batch, seq]``, 1 on real tokens.
        pooling: ``"mean"`` (mean over real tokens), ``"last"`` (the last real token),
            or ``"weighted_mean"`` (SGPT: token ``i`` of ``n`` weighs ``i / sum(1..n)``).

    Returns:
        One fp32 vector per row; padding positions never contribute.
    """
    hidden = hidden.float()
    mask = mask.to(hidden.dtype)
    if pooling == "last":
        last = mask.sum(dim=1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask
    if pooling == "weighted_mean":
        positions = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=mask.dtype)
        weights = mask * positions
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.bmm(weights[:, None, :], hidden).squeeze(1)


class Baichuan2Embeddings(BaseModel, Embeddings):
    """Text embeddings from a locally run Baichuan2 model, sharing the chat model's weights.

    Each text is run through the decoder (no LM head) and its hidden states are pooled
    into one vector: the mean over tokens (default), the last token, or SGPT's
    position-weighted mean, from the final layer (after the final norm) or any layer.
    The weights load lazily, once, on the first call, through the same registry as
    ``ChatBaichuan2``: a chat model and embeddings configured alike hold one model
    in memory. Construction never loads anything.

    Texts of one call are sorted by token count and cut into batches, so little
    compute goes to padding; padding never changes a vector. A batch holds at most
    ``batch_size`` texts and 8,192 tokens (the memory the native engine sets aside
    for an embedding forward). Results come back in input order. An empty text has
    no tokens, so it is embedded as the one-token text ``[eos]`` (``</s>``, the
    end-of-text marker).

    Setup:
        ```bash
        pip install torch  # the build for your GPU, or torch==2.13.0 on CPU
        pip install langchain-baichuan2
        ```

    Key init args:
        model: A local folder or a model id such as ``"baichuan-inc/Baichuan2-7B-Chat"``.
        pooling: ``"mean"``, ``"last"`` or ``"weighted_mean"``.
        hidden_layer: None (final hidden states) or a layer index such as ``-2``.
        query_instruction / document_instruction: Prefixes for queries / documents.

    Instantiate:
        ```python
        from langchain_baichuan2 import Baichuan2Embeddings, ChatBaichuan2

        embeddings = Baichuan2Embeddings(model="baichuan-inc/Baichuan2-7B-Chat")

        # Or share the weights of a chat model you already have:
        llm = ChatBaichuan2(model="baichuan-inc/Baichuan2-7B-Chat")
        embeddings = Baichuan2Embeddings.from_chat_model(llm, pooling="weighted_mean")
        ```

    Embed single text:
        ```python
        vector = embeddings.embed_query("温故而知新是什么意思？")
        vector[:3]
        # [0.0123, -0.0087, 0.0311]
        len(vector) == embeddings.dimension  # 4096 for the 7B model
        ```

    Embed multiple texts:
        ```python
        vectors = embeddings.embed_documents(
            ["温故而知新，可以为师矣。", "Reviewing the old reveals the new."]
        )
        len(vectors), len(vectors[0])
        # (2, 4096)
        ```

    Async:
        ```python
        vector = await embeddings.aembed_query("温故而知新是什么意思？")
        vectors = await embeddings.aembed_documents(["文档一", "Document two"])
        ```
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _check_argument_names(cls, values: Any) -> Any:
        return reject_unknown_arguments(cls, values)

    model: str = Field(alias="model_name")
    """A local checkpoint folder, or a model id (``"baichuan-inc/Baichuan2-13B-Chat"``)."""

    revision: str | None = None
    """Branch, tag or commit of a downloaded model. Default: the hub's default."""

    source: Literal["auto", "local", "modelscope", "huggingface"] = "auto"
    """Where ``model`` comes from: ``"auto"`` uses a folder if it exists, else
    ModelScope, then the Hugging Face Hub."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weight dtype; ``"auto"`` is bfloat16 on GPU and float32 on CPU. Pooling is
    always computed in float32."""

    device_map: str | dict | None = None
    """transformers ``device_map``; None puts the model on the GPU if any, else CPU."""

    quantization: Literal["4bit", "8bit"] | BitsAndBytesConfig | None = None
    """bitsandbytes quantization at load: ``"4bit"`` (NF4, double quant), ``"8bit"``,
    or a ``BitsAndBytesConfig``. Default: none."""

    pooling: Pooling = "mean"
    """How token states become one vector: ``"mean"`` (over real tokens), ``"last"``
    (the last token's state) or ``"weighted_mean"`` (SGPT: later tokens weigh more,
    weights 1..n normalized). Default: ``"mean"``."""

    hidden_layer: int | None = None
    """Which hidden states to pool. None: the final ones, after the final norm. An int
    indexes the model's ``hidden_states`` like a Python list: 0 is the token
    embeddings, ``i`` the output of layer ``i``, -1 the final (normed) states, -2 the
    output of the second-to-last layer. Checked against the model on first use."""

    normalize: bool = True
    """Whether vectors are scaled to unit L2 norm (so dot product = cosine)."""

    query_instruction: str = ""
    """Text put before every query by ``embed_query``. Default: none."""

    document_instruction: str = ""
    """Text put before every document by ``embed_documents``. Default: none."""

    max_length: int | None = Field(default=None, ge=1)
    """Most tokens per text (instruction included); longer texts keep their first
    ``max_length`` tokens and each call warns once with the count. Default: the
    checkpoint's ``model_max_length`` (4096)."""

    batch_size: int = Field(default=16, ge=1)
    """Texts per forward pass."""

    parse_special_tokens: bool = False
    """Whether ``<s>``, ``</s>``, ``<unk>`` and ``<reserved_N>`` written in a text become
    control tokens, as the official tokenizer does. Default False: text is text."""

    show_progress: bool | None = None
    """Progress bars for loading the weights and for calls of more than one batch.
    None: only in a terminal or notebook (so not in CI or under pytest)."""

    adapter: str | None = None
    """A PEFT LoRA adapter (folder, ModelScope or Hub id) applied to every text; read
    on first use and shared with the chat models of the same loaded model."""

    @classmethod
    def from_chat_model(cls, chat: ChatBaichuan2, **kwargs: Any) -> Baichuan2Embeddings:
        """Build embeddings that share ``chat``'s loaded model.

        Args:
            chat: The chat model whose weights (model, revision, source, dtype,
                device_map, quantization) to use.
            **kwargs: Other fields, such as ``pooling`` or ``query_instruction``.

        Returns:
            Embeddings configured like ``chat``, so both hold the same model object.
        """
        return cls(**{name: getattr(chat, name) for name in _MODEL_FIELDS}, **kwargs)

    def loaded_model(self) -> LoadedModel:
        """Return the shared loaded model (loading it on first use)."""
        return engines.loaded_model(engines.EngineSpec.of(self))

    def unload(self) -> bool:
        """Free the loaded model (shared with chat models configured alike).

        The next call loads it again. Returns whether it was loaded.
        """
        return engines.release(engines.EngineSpec.of(self))

    @property
    def dimension(self) -> int:
        """Length of every vector: the model's hidden size (loads the model if needed)."""
        return int(self.loaded_model().model.config.hidden_size)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents, each prefixed with ``document_instruction``.

        Args:
            texts: The documents.

        Returns:
            One vector per document, in input order.
        """
        texts = _check_texts(texts)
        return self._embed([self.document_instruction + text for text in texts])

    def embed_query(self, text: str) -> list[float]:
        """Embed a query, prefixed with ``query_instruction``.

        Args:
            text: The query.

        Returns:
            Its vector.
        """
        if not isinstance(text, str):
            msg = f"text must be a str, got {type(text).__name__}: {text!r:.60}"
            raise TypeError(msg)
        return self._embed([self.query_instruction + text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async :meth:`embed_documents`; the model runs in a worker thread."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """Async :meth:`embed_query`; the model runs in a worker thread."""
        return await asyncio.to_thread(self.embed_query, text)

    # -- the work -----------------------------------------------------------------------

    def _tokenize(self, loaded: LoadedModel, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, cut to ``max_length``; an empty text becomes ``[eos]``."""
        tokenizer = loaded.tokenizer
        limit = self.max_length or int(loaded.model.config.model_max_length)
        encoder = tokenizer if self.parse_special_tokens else literal_text_encoder(tokenizer)
        ids = [encoder.encode(text, add_special_tokens=False) for text in texts]
        cut = sum(len(row) > limit for row in ids)
        if cut:
            logger.warning(
                "%d of %d texts were longer than max_length=%d tokens and were truncated "
                "to their first %d tokens",
                cut,
                len(ids),
                limit,
                limit,
            )
        eos = eos_token_ids(loaded.generation_config, tokenizer)[0]
        return [row[:limit] or [eos] for row in ids]

    def _check_hidden_layer(self, loaded: LoadedModel) -> None:
        """Raise if ``hidden_layer`` does not index this model's hidden states."""
        if self.hidden_layer is None:
            return
        layers = int(loaded.model.config.num_hidden_layers)
        if not -(layers + 1) <= self.hidden_layer <= layers:
            msg = (
                f"hidden_layer must be in [{-(layers + 1)}, {layers}] for this model "
                f"({layers} layers: index 0 is the embeddings), got {self.hidden_layer}"
            )
            raise ValueError(msg)

    @torch.inference_mode()
    def _embed_batch(
        self,
        loaded: LoadedModel,
        batch_ids: Sequence[Sequence[int]],
        adapter: lora.Adapter | None = None,
    ) -> torch.Tensor:
        """Embed one batch of token id lists; returns ``[batch, hidden]`` fp32 on CPU."""
        decoder = loaded.model.model
        input_ids, mask = _right_padded(
            batch_ids, loaded.model.config.pad_token_id or 0, decoder.embed_tokens.weight.device
        )
        # Right padding needs no attention mask: under the causal mask a real token
        # never sees the pads after it, positions start at 0 for every row, and pad
        # outputs are excluded by the pooling. Skipping it also keeps the 13B (ALiBi)
        # mask at one [1, heads, L, L] tensor instead of one per text.
        layers = len(decoder.layers)
        index = layers if self.hidden_layer is None else self.hidden_layer % (layers + 1)
        kept: list[torch.Tensor] = []
        # Only the pooled layer's states are kept (not every layer's, as
        # output_hidden_states would): index 0 is the embeddings, i the output of layer i.
        source = decoder.embed_tokens if index == 0 else decoder.layers[index - 1]
        hook = None
        if index < layers:
            hook = source.register_forward_hook(lambda _module, _args, out: kept.append(out))
        try:
            with loaded.lock, lora.applied(loaded.model, adapter):
                out = decoder(input_ids=input_ids, attention_mask=None, use_cache=False)
        finally:
            if hook is not None:
                hook.remove()
        hidden = kept[0] if kept else out.last_hidden_state
        vectors = _pool(hidden, mask, self.pooling)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.cpu()

    def _embed(self, texts: list[str]) -> list[list[float]]:
        """Embed texts in length-sorted batches; return the vectors in input order."""
        if not texts:
            return []
        loaded = self.loaded_model()
        self._check_hidden_layer(loaded)
        adapter = None
        if self.adapter is not None:
            folder = resolve_adapter_path(self.adapter, revision=None, source=self.source)
            adapter = shared_adapter(loaded, str(folder))
        ids = self._tokenize(loaded, texts)
        batches = _batches([len(row) for row in ids], self.batch_size)
        order = [i for batch in batches for i in batch]
        show = progress_enabled(self.show_progress)
        bar = tqdm(batches, desc="Embedding", unit="batch", disable=not show or len(batches) < 2)
        try:
            sorted_vectors = torch.cat(
                [self._embed_batch(loaded, [ids[i] for i in batch], adapter) for batch in bar]
            )
        finally:  # a chat engine sharing the model decodes faster without this pool
            free_openmp_threads(loaded.model.device)
        vectors = torch.empty_like(sorted_vectors)
        vectors[torch.tensor(order)] = sorted_vectors
        return vectors.tolist()
