"""The project's error hierarchy, caught once at the CLI boundary (host/cli.py)."""
from __future__ import annotations


class RwkvStreamError(Exception):
    """Base of every error the CLI turns into one line and an exit status."""

    exit_status = 2

    def __init__(self, message: str, *, path=None, tensor: str | None = None,
                 offset: int | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.offset = offset
        super().__init__(self.line())

    def line(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.tensor:
            where.append(f"tensor {self.tensor!r}")
        if self.offset is not None:
            where.append(f"byte offset {self.offset}")
        return (": ".join([", ".join(where), self.message]) if where else self.message)


class BadInput(RwkvStreamError):
    """A file or value the tool cannot use (missing, truncated, malformed, unsupported)."""


class UsageError(RwkvStreamError):
    """Arguments that do not fit together."""


class CheckFailed(RwkvStreamError):
    """A check the user asked for found a problem (e.g. `validate` on a bad stream)."""

    exit_status = 1
