"""Triton kernels for the routed experts (one file per kernel, launch configs as data in configs/)."""

from expert_workers.kernels.fp8_moe import fused_moe_fp8
from expert_workers.kernels.launcher import KernelInputError, fused_moe

__all__ = ["KernelInputError", "fused_moe", "fused_moe_fp8"]
