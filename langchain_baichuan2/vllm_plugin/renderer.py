"""vLLM's chat renderer for Baichuan2: messages become ids, never text to tokenize again.

Registered as vLLM renderer (and tokenizer) mode ``"baichuan2"``, the mode the plugin
picks for Baichuan checkpoints when ``--tokenizer-mode`` is left at ``auto``. Chat
requests (``/v1/chat/completions``, ``/tokenize`` with messages, ``LLM.chat``) get the
ids of :func:`.chat.chat_prompt_ids` (with the request's tools, unless its
``tool_choice`` is ``"none"``); a chat template named by the server
(``--chat-template``) or the request is applied as vLLM's HF renderer applies it. A
template in the checkpoint's own tokenizer config is not used: it would parse typed
control strings as tokens. A request whose messages or tools cannot become a prompt is
refused with vLLM's validation error (HTTP 400 naming the field). Everything else
(completions, token ids, detokenizing) is the HF renderer's.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.renderers.chat_utils import (
    ChatCompletionMessageParam,
    ConversationMessage,
    parse_chat_messages,
    parse_chat_messages_async,
)
from vllm.renderers.hf import HfRenderer
from vllm.renderers.inputs import DictPrompt
from vllm.renderers.inputs.preprocess import parse_dec_only_prompt
from vllm.renderers.params import ChatParams
from vllm.tokenizers.hf import HfTokenizer
from vllm.utils.async_utils import make_async

from langchain_baichuan2.prompt import literal_text_encoder
from langchain_baichuan2.vllm_plugin.chat import ChatRequestError, chat_prompt_ids


class Baichuan2Renderer(HfRenderer):
    """HF renderer whose chat prompts are ``ChatBaichuan2``'s ids (message text literal)."""

    def __init__(self, config: VllmConfig, tokenizer: HfTokenizer | None) -> None:
        super().__init__(config, tokenizer)
        self.generation_config = config.model_config.try_get_generation_config()
        self._prompt_ids_async = make_async(self._prompt_ids, executor=self._executor)

    @staticmethod
    def _uses_template(params: ChatParams) -> bool:
        """True when the server or the request named a chat template; vLLM applies it."""
        return params.chat_template is not None

    def _prompt_ids(
        self, messages: list[ChatCompletionMessageParam], params: ChatParams
    ) -> list[int]:
        """The prompt ids of a conversation (see :func:`.chat.chat_prompt_ids`).

        Raises:
            VLLMValidationError: If the messages or tools cannot become a prompt.
        """
        kwargs = params.chat_template_kwargs
        try:
            return chat_prompt_ids(
                messages,
                literal_text_encoder(self.get_tokenizer()),
                self.generation_config,
                add_generation_prompt=kwargs.get("add_generation_prompt", True),
                tools=kwargs.get("tools"),
                tool_choice=params.tool_choice,
            )
        except ChatRequestError as e:
            raise VLLMValidationError(str(e), parameter=e.parameter) from e

    def render_messages(
        self, messages: list[ChatCompletionMessageParam], params: ChatParams
    ) -> tuple[list[ConversationMessage], DictPrompt]:
        """The conversation as vLLM parses it, and the prompt as token ids."""
        if self._uses_template(params):
            return super().render_messages(messages, params)
        # Ids first: vLLM's parsing rewrites tool call arguments in place.
        ids = self._prompt_ids(messages, params)
        conversation, _, _ = parse_chat_messages(
            messages, self.model_config, content_format="openai"
        )
        return conversation, parse_dec_only_prompt(ids)

    async def render_messages_async(
        self, messages: list[ChatCompletionMessageParam], params: ChatParams
    ) -> tuple[list[ConversationMessage], DictPrompt]:
        """:meth:`render_messages`, with the encoding on the renderer's thread pool."""
        if self._uses_template(params):
            return await super().render_messages_async(messages, params)
        ids = await self._prompt_ids_async(messages, params)
        conversation, _, _ = await parse_chat_messages_async(
            messages, self.model_config, content_format="openai"
        )
        return conversation, parse_dec_only_prompt(ids)
