"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a short paragraph and exits non-zero; anything
else is a bug in grpo and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (recipe, data, model, paths), with how to fix it."""

    exit_code = 2
