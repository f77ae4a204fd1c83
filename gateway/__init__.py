"""Gateway: the model minus routed experts, the expert dispatch, and the public Engine API."""

from gateway.serving.engine import Engine
from gateway.serving.sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams"]
