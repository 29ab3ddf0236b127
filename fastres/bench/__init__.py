"""fastres's benchmark harness: `fastres bench layers|models|profile` (also `python -m fastres.bench`).

harness.py   timing (do_bench), input rotation, environment, measured ceilings
layers.py    per-layer suite: fused layers vs eager / cuDNN conv alone / torch.compile
models.py    whole-model suite: fastres.optimize vs eager / torch.compile / CUDA graphs
report.py    rows, terminal table, JSON (saved after every case), plots, --compare
profile.py   `fastres bench profile`: the layers' kernels under Nsight Compute (ncu)
"""
