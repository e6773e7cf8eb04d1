"""`Throttle`: how often a warning about a condition that lasts is repeated. The first step it holds is said,
then at most every `every` steps while it goes on, with the count of the steps it held in between: a warning
each step would bury the progress it is about, and one warning only would be scrolled away."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Throttle:
    every: int  # steps at least between two warnings while the condition lasts
    last_warned: int | None = None
    steps_over: int = 0  # steps the condition held since the last warning

    def due(self, step: int) -> str | None:
        """Called on a step where the condition holds: None (not this step), or what to add to the warning
        ("" the first time; after that how many of the steps since the last warning it held on)."""
        self.steps_over += 1
        if self.last_warned is not None and step - self.last_warned < self.every:
            return None
        since = "" if self.last_warned is None else \
            f" ({self.steps_over} of the {step - self.last_warned} steps since step {self.last_warned} did)"
        self.last_warned, self.steps_over = step, 0
        return since
