"""fastres's benchmark harness: `fastres bench layers|models` (also `python -m fastres.bench`).

harness.py   timing (do_bench), input rotation, environment, measured ceilings
layers.py    per-layer suite: fused layers vs eager / cuDNN conv alone / torch.compile
models.py    whole-model suite: fastres.optimize vs eager / torch.compile / CUDA graphs
report.py    rows, terminal table, JSON, plots, --compare
"""
