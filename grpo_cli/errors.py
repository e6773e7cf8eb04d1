"""The one exception type for mistakes a user can fix, how to recognise the operating system's, and how a
message lists the places a problem was found.

The CLI prints a `UserError` as a short paragraph and exits non-zero; anything
else is a bug in grpo and keeps its traceback.
"""


SHOWN = 5  # places named per problem in a message; the rest are counted


class UserError(Exception):
    """A mistake in the user's input (recipe, data, model, paths), with how to fix it."""

    exit_code = 2


def os_error(exc: BaseException) -> OSError | None:
    """`exc` as the operating system's error when it is one (a full disk, a read-only place), else None:
    a bug. safetensors reports a failed write as SafetensorError("... I/O error: ... (os error 28)"),
    not as an OSError."""
    import os
    import re

    if isinstance(exc, OSError):
        return exc
    code = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    return OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else None


def listed(items: list[str], separator: str = ", ") -> str:
    """The first few of a message's items, and how many more there are."""
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return separator.join(items[:SHOWN]) + more
