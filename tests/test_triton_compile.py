"""The Triton kernels compile for real GPUs on this GPU-less machine (Triton's AOT path, ptxas
included), for the exact arguments the launchers pass at full ResNet sizes; and on Hopper every
fp16 / bf16 / TF32 GEMM variant uses wgmma, on Ampere mma.sync (see fastres/kernels/aot.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

H100_MAX_SHARED_BYTES = 232448  # per block, opt-in


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastres.kernels.aot", "--arch", "90", "80", "--json"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_variant_compiles(compiled):
    failed = {r["name"]: r["error"] for r in compiled if not r["ok"]}
    assert not failed


def test_hopper_gemms_use_wgmma(compiled):
    for row in compiled:
        if row["arch"] == 90 and row["ok"]:
            assert (row["wgmma"] > 0) == row["expect_tensor_cores"], row


def test_ampere_gemms_use_mma_sync(compiled):
    for row in compiled:
        if row["arch"] == 80 and row["ok"]:
            assert (row["mma_sync"] > 0) == row["expect_tensor_cores"], row


def test_every_config_fits_hopper_shared_memory(compiled):
    configs = [r for r in compiled if r["arch"] == 90 and "config" in r["name"]]
    assert len(configs) == 8
    assert all(r["shared_bytes"] <= H100_MAX_SHARED_BYTES for r in configs)
