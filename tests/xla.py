"""XLA flags for the tests' processes (this one, and every subprocess and pod worker they start).

`--xla_backend_optimization_level=0` compiles with LLVM's cheapest optimisation: the tests'
programs are tiny and run in microseconds, while compiling them at the default level took more
than half of the suite's CPU time (tests/train/test_chunked_loss.py: 106 s of CPU -> 48 s).
Results still agree with PyTorch within the tests' bounds, and runs the tests compare bitwise
are compiled alike.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 8) -> str:
    """`devices` fake CPU devices, compiled fast."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
