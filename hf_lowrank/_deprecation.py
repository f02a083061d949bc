"""Deprecated names kept for one release: keyword arguments renamed to the package's one name for a job.

A leaf module (standard library only), so any module can use it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["RENAMED_KEYWORDS", "renamed_keywords"]

F = TypeVar("F", bound=Callable[..., Any])

#: ``{function qualname: {old keyword: new keyword}}`` of every function decorated below (the tests read it)
RENAMED_KEYWORDS: dict[str, dict[str, str]] = {}


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Accept each ``old=`` keyword of the decorated function as its new name, with a ``DeprecationWarning``.

    ``@renamed_keywords(output_dir="path")``: ``f(output_dir=x)`` calls ``f(path=x)`` and warns; passing both is a
    ``TypeError`` naming the one to keep.
    """

    def decorate(fn: F) -> F:
        RENAMED_KEYWORDS.setdefault(fn.__qualname__, {}).update(renames)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    name = getattr(fn, "__qualname__", fn.__name__)
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old}= and {new}=; pass {new}= only ({old}= is its "
                                        "deprecated name).")
                    warnings.warn(f"{name}({old}=...) is deprecated and will be removed in the next release; use "
                                  f"{new}=...", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
