"""Constructor-argument checks shared by ``ChatBaichuan2`` and ``Baichuan2Embeddings``."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel


def reject_unknown_arguments(cls: type[BaseModel], values: Any) -> Any:
    """Raise ``ValueError`` naming each argument ``cls`` has no field for.

    A misspelled or foreign argument (``max_new_tokens`` for ``max_tokens``) would
    otherwise be ignored and the default used without a word; the message suggests the
    closest field name.
    """
    if not isinstance(values, dict):
        return values
    names = set(cls.model_fields)
    names |= {f.alias for f in cls.model_fields.values() if f.alias}
    unknown = sorted(set(values) - names)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        msg = f"{cls.__name__} got unknown argument(s) {', '.join(hints)}"
        raise ValueError(msg)
    return values
