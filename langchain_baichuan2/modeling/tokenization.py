"""Baichuan2's SentencePiece tokenizer as a transformers-5 slow tokenizer."""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SPIECE_UNDERLINE = "▁"


class BaichuanTokenizer(SentencePieceBackend):
    r"""Baichuan2's tokenizer: SentencePiece BPE with byte fallback and no dummy prefix.

    It reproduces the official ``tokenization_baichuan.BaichuanTokenizer`` id for id,
    loads the official ``tokenizer_config.json`` unchanged and runs no code from the
    checkpoint folder. ``<s>``, ``</s>`` and ``<unk>`` written in text map to ids 1, 2
    and 0; all other text, including the user-defined pieces such as ``"\n"`` (id 5)
    and ``"<reserved_106>"`` (id 195), is SentencePiece's own segmentation.

    Example:
        ```python
        from langchain_baichuan2.modeling import BaichuanTokenizer

        tok = BaichuanTokenizer.from_pretrained("path/to/Baichuan2-7B-Chat")
        tok.encode("<reserved_106>你好")  # [195, 16829]
        tok.decode([195, 16829])  # "<reserved_106>你好"
        ```
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = "<unk>",
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        """Loads ``vocab_file`` (a SentencePiece ``tokenizer.model``).

        Args:
            vocab_file: Path of the SentencePiece model.
            unk_token: Unknown token, id 0.
            bos_token: Beginning-of-sequence token, id 1.
            eos_token: End-of-sequence token, id 2.
            pad_token: Padding token; the official files use ``<unk>`` (id 0).
            sp_model_kwargs: Passed to ``SentencePieceProcessor``.
            add_bos_token: Prepend ``bos_token`` when adding special tokens.
            add_eos_token: Append ``eos_token`` when adding special tokens.
            clean_up_tokenization_spaces: Apply transformers' English space clean-up
                when decoding; off, as in the official files, so decoding is exact.
            **kwargs: Passed to ``SentencePieceBackend``.
        """
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=sp_model_kwargs or {},
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # Per skip_special_tokens setting; filled by token_bytes on first use.
        self._token_bytes: dict[bool, tuple[bytes, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # The byte tables are several MB and cheap to rebuild.
        state["_token_bytes"] = {}
        return state

    def _eventual_warn_about_too_long_sequence(
        self, ids: list[int], max_length: int | None, verbose: bool
    ) -> None:
        """Never warns that a text is longer than ``model_max_length``.

        The prompt builder cuts prompts to fit by the official history rule, and the
        engines refuse a prompt longer than the context, with the numbers.
        """

    def get_vocab(self) -> dict[str, int]:
        """Returns the mapping from piece (or added token) to id."""
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.sp_model.get_piece_size())}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _add_tokens(
        self, new_tokens: list[str] | list[AddedToken], special_tokens: bool = False
    ) -> int:
        added = super()._add_tokens(new_tokens, special_tokens=special_tokens)
        self._token_bytes = {}
        return added

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decodes pieces with SentencePiece, writing added and special tokens literally."""
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._added_tokens_encoder:
                # SentencePiece would drop <s>/</s> and turn <unk> into " ⁇ ".
                parts.append(self.sp_model.decode(run))
                parts.append(token)
                run = []
            else:
                run.append(token)
        parts.append(self.sp_model.decode(run))
        return "".join(parts)

    def token_bytes(self, skip_special_tokens: bool = False) -> tuple[bytes, ...]:
        """Returns the UTF-8 bytes each id decodes to, indexed by id.

        Byte-fallback pieces ``<0xNN>`` give their single byte, other pieces their text
        with ``▁`` as a space, added tokens their content, and special tokens nothing
        when ``skip_special_tokens``. Joining these bytes and decoding them with
        ``decoding.SENTENCEPIECE_UTF8_ERRORS`` equals ``decode(ids)``. Built once per
        tokenizer and setting.

        Args:
            skip_special_tokens: Whether special tokens map to ``b""``.

        Returns:
            One ``bytes`` per id, ``len(self)`` of them.
        """
        table = self._token_bytes.get(skip_special_tokens)
        if table is not None:
            return table
        sp = self.sp_model
        pieces: list[bytes] = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                pieces.append(bytes((int(piece[3:5], 16),)))
            elif sp.is_control(i):
                pieces.append(b"")
            else:
                pieces.append(piece.replace(SPIECE_UNDERLINE, " ").encode("utf-8"))
        pieces.extend(b"" for _ in range(len(self) - len(pieces)))
        specials = set(self.all_special_ids)
        for index, token in self._added_tokens_decoder.items():
            skip = skip_special_tokens and index in specials
            pieces[index] = b"" if skip else token.content.encode("utf-8")
        table = tuple(pieces)
        self._token_bytes[skip_special_tokens] = table
        return table

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Wraps each sequence in BOS/EOS as ``add_bos_token``/``add_eos_token`` ask.

        Args:
            token_ids_0: First sequence.
            token_ids_1: Optional second sequence.

        Returns:
            ``[bos] ids_0 [eos]`` followed, for a pair, by ``[bos] ids_1 [eos]``.
        """
        return self._wrap(token_ids_0, token_ids_1, self.bos_token_id, self.eos_token_id)

    def _wrap(self, first: list[int], second: list[int] | None, bos: int, eos: int) -> list[int]:
        """Surround each sequence with ``bos``/``eos`` where the tokenizer adds them."""
        head = [bos] if self.add_bos_token else []
        tail = [eos] if self.add_eos_token else []
        output = head + first + tail
        if second is not None:
            output += head + second + tail
        return output

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """Marks the BOS/EOS that ``build_inputs_with_special_tokens`` adds with 1.

        Args:
            token_ids_0: First sequence.
            token_ids_1: Optional second sequence.
            already_has_special_tokens: Whether the ids already include them.

        Returns:
            1 for a special token, 0 for a sequence token.
        """
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        second = None if token_ids_1 is None else [0] * len(token_ids_1)
        return self._wrap([0] * len(token_ids_0), second, 1, 1)

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Returns 0 for the first sequence and its special tokens, 1 for the second.

        Args:
            token_ids_0: First sequence.
            token_ids_1: Optional second sequence.

        Returns:
            The token type ids, one per id of ``build_inputs_with_special_tokens``.
        """
        first = len(self.build_inputs_with_special_tokens(token_ids_0))
        if token_ids_1 is None:
            return [0] * first
        return [0] * first + [1] * len(self.build_inputs_with_special_tokens(token_ids_1))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> tuple[str, ...]:
        """Saves like transformers, keeping ``add_bos_token`` and ``add_eos_token``.

        transformers 5 leaves both out of ``tokenizer_config.json`` because its fast
        tokenizers keep them in ``tokenizer.json``; this tokenizer has no such file.
        The official ``auto_map`` is dropped: the saved folder has no
        ``tokenization_baichuan.py`` for it to point to.

        Args:
            save_directory: Folder to write to.
            legacy_format: As for ``PreTrainedTokenizerBase.save_pretrained``.
            filename_prefix: Prefix of the written file names.
            push_to_hub: As for ``PreTrainedTokenizerBase.save_pretrained``.
            **kwargs: Passed to ``PreTrainedTokenizerBase.save_pretrained``.

        Returns:
            The paths of the files written.
        """
        files = super().save_pretrained(
            save_directory,
            legacy_format=legacy_format,
            filename_prefix=filename_prefix,
            push_to_hub=push_to_hub,
            **kwargs,
        )
        name = (f"{filename_prefix}-" if filename_prefix else "") + "tokenizer_config.json"
        config_file = os.path.join(save_directory, name)
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        config.pop("auto_map", None)
        config["add_bos_token"] = self.add_bos_token
        config["add_eos_token"] = self.add_eos_token
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files


__all__ = ["BaichuanTokenizer"]
