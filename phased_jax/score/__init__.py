"""Difficulty from the base model (`phased-jax score`): answer loss and IFD, as 1-5 scores.

`run` is the subcommand, `losses` the batched forward passes, `rows` the input rows kept whole,
`scale` the raw -> 1-5 map and the paper's stage shares (JAX-free; `phased-jax stats` uses it).
"""
