"""Difficulty scoring and pairwise judging against OpenAI-compatible servers.

Depends on `openai`, the standard library and phased_jax's JAX-free file layer (`fileio`,
`formats`: the same reader and record parser training uses); tqdm and matplotlib are optional
extras for the progress bar and the chart. It runs on any laptop without JAX
(tests/tools/test_no_jax.py checks it).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
