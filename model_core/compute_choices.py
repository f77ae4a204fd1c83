"""The names a deployment picks its compute by: the model's dtype and the kernels for expert and attention math.

One definition, checked by the gateway's config, offered by the CLI and checked again by the expert workers
(which may not import the gateway).
"""

from __future__ import annotations

MODEL_DTYPES = ("float32", "bfloat16", "float16")  # the weights' and hidden states' dtype (all travel on the wire)
KERNELS = ("auto", "triton", "torch")  # auto: Triton on CUDA, torch on CPU
# How expert groups hold a block-wise FP8 checkpoint's routed experts: fp8 (as stored, with their scale tiles),
# none (widened to the model's dtype on read), auto (fp8 when the checkpoint is FP8)
QUANTIZATIONS = ("auto", "fp8", "none")
