"""Imported first by the tests' `train` and `score` subprocesses: they run as users run, without
torch. torch is a test-only extra (the reference the models match); `transformers` imports it
whenever it is installed, which cost every run's start 2 s and 190 MB here. A None entry in
`sys.modules` is how Python says a package is absent: `transformers` then finds no torch."""

import sys

sys.modules.setdefault("torch", None)
