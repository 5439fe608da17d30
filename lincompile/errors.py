"""Errors with one clear line for the user, and the exit code the CLI should use."""

from __future__ import annotations

import difflib


class LincompileError(Exception):
    """A failure the user can act on. `str(err)` is the whole message: one line."""

    exit_code = 1


class UsageError(LincompileError):
    """Bad input from the user (spec, flags, paths): exit code 2."""

    exit_code = 2


class SpecError(UsageError):
    """A problem in a spec file, located as `file:line:col`."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None, col: int | None = None):
        self.file, self.line, self.col, self.bare = file, line, col, message
        where = ""
        if file is not None:
            where = f"{file}:{line}:{col}: " if line is not None else f"{file}: "
        super().__init__(where + message)


class ModelError(UsageError):
    """The model can't be loaded or isn't a causal LM."""


class CaptureError(LincompileError):
    """torch.export failed or the captured graph does not reproduce the model."""


class MatchError(UsageError):
    """No site (or not the selected sites) found in the graph."""


class VerifyError(LincompileError):
    """The converted model failed verification (non-finite outputs, identity mismatch)."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean "x"?)' when a close choice exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
