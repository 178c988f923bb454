"""The single lookup helper for the plain-dict registries (models, datasets, surrogates, modes)."""
from typing import Mapping, TypeVar

from rekd.errors import UsageError

V = TypeVar("V")


def lookup(registry: Mapping[str, V], name: str, what: str) -> V:
    """`registry[name]`, or a UsageError that names the bad key and lists the valid ones."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        allowed = ", ".join(sorted(registry))
        raise UsageError(f"unknown {what} {name!r}; allowed: {allowed}") from None
