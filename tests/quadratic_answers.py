"""Four graded answers to "solve x^2 - 5x + 6 = 0" (roots 2 and 3): worked and right, worked but wrong, bare
boxes, and a reflection that corrects itself. rules.py's docstring gives the ranking the default weights produce;
tests/test_rewards.py and tests/test_scored_groups.py check it."""

QUESTION = "Solve x^2 - 5x + 6 = 0."
GOLD = "2, 3"

FACTORED = (
    "We look for two numbers whose product is 6 and whose sum is 5: 2 and 3.\n"
    "So x^2 - 5x + 6 = (x - 2)(x - 3) = 0.\n"
    "Therefore x = 2 or x = 3.\n"
    "The answer is x = 2, 3."
)
WRONG_DISCRIMINANT = (
    "Use the quadratic formula with a = 1, b = -5, c = 6.\n"
    "The discriminant is b^2 - 4ac = 25 - 12 = 13.\n"
    "x = (5 ± sqrt(13)) / 2, so x is about 4.30 or 0.70.\n"
    "The answer is x = 4.30."
)
BARE_BOXES = "\\boxed{2}, \\boxed{3}"
REFLECTED = (
    "Complete the square: x^2 - 5x = -6, so (x - 5/2)^2 = -6 + 25/4 = 1/2.\n"
    "Wait, that went wrong: -6 + 25/4 is 1/4, not 1/2. Let me try factoring instead.\n"
    "x^2 - 5x + 6 = (x - 2)(x - 3) = 0, so x = 2 or x = 3.\n"
    "The answer is \\boxed{2, 3}."
)
