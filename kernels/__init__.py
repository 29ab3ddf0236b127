"""fastres's Triton kernels (installed as the package fastres.kernels).

One file per kernel: the @triton.jit function, its configs and its launcher together.
    conv_bn_act.py  implicit-GEMM conv + BN + residual + activation (every non-depthwise conv)
    depthwise.py    direct depthwise conv (groups == C) with the same epilogue
    epilogue.py     the shared epilogue math, and a stand-alone epilogue pass for the cuDNN backend
    aot.py          compiles every kernel for sm_90 / sm_80 without a GPU and reports wgmma / mma.sync use
"""

from __future__ import annotations


def interpreted() -> bool:
    """True when these kernels were decorated under TRITON_INTERPRET=1 (they then take CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastres.kernels.epilogue import epilogue_kernel

    return isinstance(epilogue_kernel, InterpretedFunction)
