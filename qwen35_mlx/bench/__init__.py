"""Timing your own setup: random-weight checkpoints in the released layout, and the `bench`
commands (generation speed, start-up, prefill memory, warm turns)."""
