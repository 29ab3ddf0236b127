"""pytest-benchmark suites over the same cases as `fastres bench`. On a GPU:
    pytest benchmarks/ --benchmark-enable --benchmark-json=bench.json
On a CPU they run once each (the test suite's --benchmark-disable) on the smoke cases, through
the Triton interpreter, which checks that they work and measures nothing."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
