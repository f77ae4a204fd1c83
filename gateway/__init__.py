"""Gateway: the model minus routed experts, the expert dispatch, and the public Engine API."""

from gateway.serving.engine import Engine

__all__ = ["Engine"]
