"""The names a deployment picks its compute by: the model's dtype and the kernels for expert and attention math.

One definition, checked by the gateway's config, offered by the CLI and checked again by the expert workers
(which may not import the gateway).
"""

from __future__ import annotations

MODEL_DTYPES = ("float32", "bfloat16", "float16")  # the weights' and hidden states' dtype (all travel on the wire)
KERNELS = ("auto", "triton", "torch")  # auto: Triton on CUDA, torch on CPU
