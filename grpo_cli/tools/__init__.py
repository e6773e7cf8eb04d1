"""The code tool: its format in text (a python block, the output block) and the sandbox that runs it."""
