"""Request settings: one rule for every value, one resolver, each backend's limits as data.

A value is checked by the same rule wherever it is given: a ``ChatBaichuan2`` field, a
bound or per-call argument, or a ``SamplingParams`` built by hand. ``resolve`` layers
them (checkpoint defaults < model fields < call arguments) into ``SamplingParams``;
``BackendLimits`` says what a backend cannot honour, before anything is started.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import GenerationConfig

    from langchain_baichuan2.tools import Constraint

# Integers (seeds, token counts) must fit a signed 64-bit integer: torch and vLLM
# take them as int64.
INT_LIMIT = 2**63
# The smallest sampling temperature: below it vLLM clamps silently and the native
# engine's logits overflow, so both backends refuse it (0 is greedy).
MIN_TEMPERATURE = 0.01

# The user-facing names of the settings ``check_values`` knows (``None``: not set).
SETTING_NAMES = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "max_tokens",
    "seed",
    "timeout",
    "model_max_length",
    "stop",
    "model_kwargs",
)


def _shown(value: object) -> str:
    """``repr(value)``, shortened when huge (a 400-digit integer, a long list)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _number(name: str, value: object) -> float:
    """``value`` as a float; raise naming ``name`` unless it is a finite real number.

    Strings and booleans are refused: ``"0.5"`` or ``True`` is a mistake, not a setting.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"{name} must be a finite number, got {type(value).__name__} {_shown(value)}"
        raise ValueError(msg)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        msg = f"{name} must be a finite number, got {_shown(value)}"
        raise ValueError(msg)
    return number


def _integer(
    name: str, value: object, low: int, hint: str = "", below: int | None = INT_LIMIT
) -> int:
    """``value`` as an int in ``[low, below)``; raise naming ``name`` otherwise."""
    wrong = f"{name} must be an integer >= {low}{hint}, got {_shown(value)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(wrong)
    if isinstance(value, int):
        if below is not None and value >= below:
            raise ValueError(f"{name} must be below 2**63, got {_shown(value)}")
        number = value
    else:
        if not math.isfinite(value) or value != int(value):
            raise ValueError(wrong)
        number = int(value)
    if number < low:
        raise ValueError(wrong)
    return number


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id_list(value: object) -> bool:
    return isinstance(value, list | tuple) and all(_is_int(i) and i >= 0 for i in value)


def check_stops(stop: Sequence[object]) -> None:
    """Raise unless every stop sequence is a non-empty string.

    Raises:
        TypeError: ``stop`` is a string, or an item is not a string.
        ValueError: An item is the empty string (it would end every answer at once).
    """
    if isinstance(stop, str):
        msg = f"stop must be a list of strings, got the string {stop!r}; use [{stop!r}]"
        raise TypeError(msg)
    for index, item in enumerate(stop):
        if not isinstance(item, str) or not item:
            msg = (
                f"stop must be a list of non-empty strings; item {index} is "
                f"{type(item).__name__} {item!r}"
            )
            raise TypeError(msg) if not isinstance(item, str) else ValueError(msg)


def check_extra_values(extra: Iterable[tuple[str, Any]], max_new_tokens: int | None = None) -> None:
    """Raise ``ValueError`` naming the first badly typed or out-of-range extra argument.

    Which backend supports which argument is ``BackendLimits``' check.
    """
    for name, value in extra:
        if name == "min_new_tokens" and not (_is_int(value) and value >= 0):
            msg = f"min_new_tokens must be an integer >= 0, got {_shown(value)}"
            raise ValueError(msg)
        if name == "min_new_tokens" and max_new_tokens is not None and value > max_new_tokens:
            msg = f"min_new_tokens ({value}) must not exceed max_tokens ({max_new_tokens})"
            raise ValueError(msg)
        if name == "no_repeat_ngram_size" and not (_is_int(value) and value >= 1):
            msg = f"no_repeat_ngram_size must be an integer >= 1, got {_shown(value)}"
            raise ValueError(msg)
        if name == "suppress_tokens" and not _is_id_list(value):
            msg = f"suppress_tokens must be a list of token ids (integers >= 0), got {value!r}"
            raise ValueError(msg)
        if name == "bad_words_ids" and not (
            isinstance(value, list | tuple)
            and value
            and all(_is_id_list(word) and word for word in value)
        ):
            msg = (
                "bad_words_ids must be a list of token-id lists, one per banned sequence "
                f"(e.g. [[5], [7, 8]]), got {value!r}"
            )
            raise ValueError(msg)


def check_values(values: Mapping[str, Any]) -> None:
    """Raise naming the first bad setting; ``None`` (or a missing key) is not set.

    The one rule for a model's fields, bound and per-call arguments and
    ``SamplingParams``: keys are ``SETTING_NAMES``; ``model_kwargs`` is a dict (or
    ``(name, value)`` pairs).

    Raises:
        ValueError: A value is of the wrong type or out of range (named).
        TypeError: ``stop`` is not a list of strings.
    """
    value = values.get("timeout")
    if value is not None and _number("timeout", value) <= 0:
        msg = f"timeout must be > 0 seconds (None for no limit), got {_shown(value)}"
        raise ValueError(msg)
    value = values.get("seed")
    if value is not None and not (_is_int(value) and 0 <= value < INT_LIMIT):
        msg = f"seed must be an integer in [0, 2**63), got {_shown(value)}"
        raise ValueError(msg)
    value = values.get("temperature")
    if value is not None and (_number("temperature", value) < 0 or 0 < value < MIN_TEMPERATURE):
        msg = (
            f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {_shown(value)}; "
            "use 0 for greedy decoding"
        )
        raise ValueError(msg)
    value = values.get("top_p")
    if value is not None and not 0 < _number("top_p", value) <= 1:
        msg = f"top_p must be in (0, 1], got {_shown(value)}"
        raise ValueError(msg)
    if values.get("top_k") is not None:
        # No bound here: the engine bounds it by its vocabulary.
        _integer("top_k", values["top_k"], 0, " (0 disables it)", below=None)
    value = values.get("repetition_penalty")
    if value is not None and _number("repetition_penalty", value) <= 0:
        msg = f"repetition_penalty must be > 0, got {_shown(value)}"
        raise ValueError(msg)
    max_tokens = values.get("max_tokens")
    if max_tokens is not None:
        _integer("max_tokens", max_tokens, 1)
    if values.get("model_max_length") is not None:
        _integer("model_max_length", values["model_max_length"], 1)
    check_stops(values.get("stop") or ())
    extra = values.get("model_kwargs")
    if extra is not None:
        check_extra_values(_extra_pairs(extra), max_tokens)


def _extra_pairs(extra: object) -> tuple[tuple[str, Any], ...]:
    """``model_kwargs`` as ``(name, value)`` pairs; raise unless it is a dict."""
    if isinstance(extra, Mapping):
        return tuple(extra.items())
    if isinstance(extra, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in extra):
        return extra
    msg = f"model_kwargs must be a dict of generate() arguments, got {_shown(extra)}"
    raise ValueError(msg)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()
    """Extra ``generate()`` arguments as ``(name, value)`` pairs; each backend's
    ``BackendLimits`` says which it supports."""
    constraint: Constraint | None = None
    """A constraint the output must follow (tool calls, JSON)."""
    reuse_prefix: bool = True
    """Whether this request may read and add to the engine's prefix cache."""
    timeout: float | None = None
    """Seconds the whole request may take; then it is stopped and raises
    ``TimeoutError``. None: no limit."""
    adapter: str | None = None
    """The LoRA adapter of this request: the resolved local folder of a PEFT adapter
    (``adapter_config.json`` and its weights; the same string for the same files).
    None: the base model."""

    def __post_init__(self) -> None:
        check_values(
            {
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty,
                "max_tokens": self.max_new_tokens,
                "seed": self.seed,
                "timeout": self.timeout,
                "stop": self.stop,
                "model_kwargs": self.extra,
            }
        )


@dataclass(frozen=True)
class BackendLimits:
    """What one backend can honour, declared as data and checked before it starts."""

    backend: str
    extra_arguments: tuple[str, ...]
    """The ``generate()`` arguments (``model_kwargs``) it applies."""
    max_temperature: float | None = None
    """The hottest sampling it accepts (None: no limit)."""

    def check(self, temperature: float | None, extra: Iterable[tuple[str, Any]]) -> None:
        """Raise ``ValueError`` for a setting this backend cannot honour (needs no model)."""
        unknown = sorted({name for name, _ in extra} - set(self.extra_arguments))
        if unknown:
            msg = (
                f"Unsupported generate() argument(s) {', '.join(unknown)} on backend "
                f"{self.backend!r}; supported there: {', '.join(self.extra_arguments)}"
            )
            raise ValueError(msg)
        if (
            self.max_temperature is not None
            and temperature is not None
            and temperature > self.max_temperature
        ):
            msg = (
                f"temperature must be at most {self.max_temperature} on backend "
                f"{self.backend!r} (vLLM's limit), got {temperature}; backend='native' "
                "samples hotter"
            )
            raise ValueError(msg)

    def check_request(self, params: SamplingParams, vocab_size: int) -> None:
        """Raise ``ValueError`` for a request this backend cannot run on a ``vocab_size`` model.

        Besides ``check``: ``top_k`` within the vocabulary, token ids inside it, and
        ``suppress_tokens`` leaving something to generate.
        """
        self.check(params.temperature, params.extra)
        if params.top_k > vocab_size:
            msg = (
                f"top_k must be at most the vocabulary size {vocab_size}, "
                f"got {_shown(params.top_k)}"
            )
            raise ValueError(msg)
        for name, value in params.extra:
            if name not in ("suppress_tokens", "bad_words_ids"):
                continue
            ids = [int(i) for item in value for i in (item if name == "bad_words_ids" else [item])]
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                msg = f"{name} holds ids outside the vocabulary 0..{vocab_size - 1}: {bad[:5]}"
                raise ValueError(msg)
            if name == "suppress_tokens" and len(set(ids)) >= vocab_size:
                raise ValueError("suppress_tokens suppresses every token: nothing can be generated")


NATIVE_LIMITS = BackendLimits(
    "native", ("min_new_tokens", "suppress_tokens", "no_repeat_ngram_size", "bad_words_ids")
)
# vLLM applies ``min_new_tokens`` as its ``min_tokens`` and refuses temperatures above 2.
VLLM_LIMITS = BackendLimits("vllm", ("min_new_tokens",), max_temperature=2.0)


def merge(fields: Mapping[str, Any], call: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a call asks for: each call argument over its field.

    Stops add up (the field's first, without duplicates); ``model_kwargs`` merge, the
    call's winning. Only ``SETTING_NAMES`` are read; ``None`` means not set.
    """
    merged = {name: call.get(name, fields.get(name)) for name in SETTING_NAMES}
    for name in SETTING_NAMES:
        if merged[name] is None:
            merged[name] = fields.get(name)
    check_stops(call.get("stop") or ())
    merged["stop"] = tuple(dict.fromkeys([*(fields.get("stop") or ()), *(call.get("stop") or ())]))
    extra = call.get("model_kwargs")
    merged["model_kwargs"] = {
        **dict(_extra_pairs(fields.get("model_kwargs") or {})),
        **dict(_extra_pairs(extra if extra is not None else {})),
    }
    return merged


def check(values: Mapping[str, Any], limits: BackendLimits) -> None:
    """Check settings by the one rule and the backend's limits (nothing is started)."""
    check_values(values)
    limits.check(values.get("temperature"), _extra_pairs(values.get("model_kwargs") or {}))


def resolve(
    defaults: GenerationConfig,
    values: Mapping[str, Any],
    *,
    constraint: Constraint | None = None,
    reuse_prefix: bool = True,
    adapter: str | None = None,
) -> SamplingParams:
    """Layer checked settings (``merge``, ``check``) over the checkpoint's defaults.

    A checkpoint that does not sample (``do_sample`` false) is greedy by default,
    whatever its temperature says. The defaults are checked by ``SamplingParams``.
    """
    sampled = bool(getattr(defaults, "do_sample", False))

    def pick(name: str, default: Any) -> Any:
        value = values.get(name)
        return default if value is None else value

    return SamplingParams(
        max_new_tokens=int(pick("max_tokens", defaults.max_new_tokens or 2048)),
        temperature=float(pick("temperature", defaults.temperature if sampled else 0.0)),
        top_p=float(pick("top_p", (defaults.top_p or 1.0) if sampled else 1.0)),
        top_k=int(pick("top_k", (defaults.top_k or 0) if sampled else 0)),
        repetition_penalty=float(pick("repetition_penalty", defaults.repetition_penalty or 1.0)),
        seed=values.get("seed"),
        stop=tuple(values.get("stop") or ()),
        extra=_extra_pairs(values.get("model_kwargs") or {}),
        constraint=constraint,
        reuse_prefix=reuse_prefix,
        timeout=values.get("timeout"),
        adapter=adapter,
    )
