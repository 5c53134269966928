"""Typed library jobs: each a dataclass of what a command's flags say and a function that runs it, called alike by
the CLI (`megatron_slim/commands/`), by a recipe's run steps and by the demo."""
