"""The recipe: its typed schema, YAML with line numbers, overrides, and the shipped recipes."""
