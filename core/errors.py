"""Errors with documented exit codes.

Exit codes (README "Exit codes"): 0 ok, 1 failure, 2 usage / bad input / missing optional
dependency, 130 interrupted. Every error carries a one-line message naming what and where,
and optionally a hint saying what to do.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class EagleError(Exception):
    """Base class: a failure the user can act on. Rendered as one line, no traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(EagleError):
    """Bad arguments or configuration, detected before any heavy work starts."""

    exit_code = EXIT_USAGE


class InputDataError(UsageError):
    """Bad input data: a missing file, a malformed line, an invalid row. Names path, row, reason."""

    def __init__(self, message: str, path: str | None = None, row: int | None = None,
                 reason: str | None = None, hint: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if row is not None:
                where += f", row {row}"
            where += ": "
        super().__init__(f"{where}{message}", hint)
        self.path, self.row, self.reason = path, row, reason or message


class MissingDependencyError(UsageError):
    """An optional package (sglang, vllm, ...) is needed but not installed."""

    def __init__(self, package: str, purpose: str, install: str | None = None):
        super().__init__(f"{package} is not installed; it is needed to {purpose}",
                         hint=f"install it with: {install or 'pip install ' + package}")
        self.package = package


class OutputExistsError(UsageError):
    """Refusing to write into a directory that already holds earlier output."""


class SettingsMismatchError(UsageError):
    """--resume into a directory made with different content settings."""

    def __init__(self, path: str, fields: dict[str, tuple[object, object]]):
        names = ", ".join(f"{k} (on disk {a!r}, now {b!r})" for k, (a, b) in sorted(fields.items()))
        super().__init__(f"{path} was made with different settings: {names}",
                         hint="use the original settings, or a new output directory")
        self.fields = fields


class CorruptDataError(EagleError):
    """A shard or checkpoint on disk fails its checksum or cannot be read."""


class FailureLimitError(EagleError):
    """Too many per-sample failures (past the stated limit)."""
