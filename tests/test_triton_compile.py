"""The Triton kernels compile for real GPUs on this GPU-less machine (Triton's AOT path, ptxas
included), for the exact arguments the launchers pass at full ResNet sizes; and on Hopper every
fp16 / bf16 / TF32 GEMM variant uses wgmma, on Ampere mma.sync; a projected residual's two
accumulators stay in registers at the tiles it is run with; TMA configs load through the TMA
engine (see fastres/kernels/aot.py)."""

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
    assert len(configs) == 24  # 8 plain, 8 TMA, 8 with a projected residual
    assert all(r["shared_bytes"] <= H100_MAX_SHARED_BYTES for r in configs)


def test_projection_keeps_its_two_accumulators_in_registers(compiled):
    """The heuristic tile for a projected residual does not spill; the tiles tuning skips for it
    (over 64 fp32 values per accumulator per thread) do, on Hopper."""
    from fastres.kernels.conv_bn_act import CONFIGS

    by_name = {(r["arch"], r["name"]): r for r in compiled}
    for arch in (90, 80):
        for dtype in ("fp16", "bf16"):
            assert by_name[(arch, f"gemm {dtype} 1x1 +projection")]["stack_bytes"] == 0
    for c in CONFIGS:
        row = by_name[(90, f"gemm fp16 +projection config {c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}w{c.num_warps}s{c.num_stages}")]
        if c.BLOCK_M * c.BLOCK_N > 64 * 32 * c.num_warps:
            assert row["stack_bytes"] > 0, row


def test_tma_configs_load_through_the_tma_engine_on_hopper(compiled):
    """TMA configs compile to bulk tensor copies (cp.async.bulk.tensor) feeding wgmma; the pointer
    configs have none; TMA variants are not built for Ampere, where they are never candidates."""
    tma = [r for r in compiled if "TMA" in r["name"]]
    assert tma and all(r["arch"] == 90 and r["tma_loads"] > 0 and r["wgmma"] > 0 for r in tma)
    assert all(r["tma_loads"] == 0 for r in compiled if r["ok"] and "TMA" not in r["name"])


def test_packed_groups_tile_does_not_spill(compiled):
    """Several ResNeXt groups per 64x64 tile keep the block-diagonal weight mask in registers."""
    rows = [r for r in compiled if "packed" in r["name"]]
    assert rows and all(r["ok"] and r["stack_bytes"] == 0 for r in rows)
