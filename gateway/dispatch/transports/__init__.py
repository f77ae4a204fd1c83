"""How dispatched bytes move: one call record, one interface, one module per transport.

- `interface`: `ExpertCall` (one device batch of one layer), `ExpertReply`, the `Transport` interface, DispatchError.
- `local`: expert groups in this process (the reference path).
- `retrying`: `ReplicaTransport`, the base of every transport over a replica pool (retries, timeouts, in-flight
  counts, a layer's batch shared by its calls).
- `ray_actor`: `ray`, Ray actor calls with numpy views; `RayCallTransport`, the waiting on ObjectRefs it shares
  with `rdt`.
- `ray_dag`: `ray-dag`, one compiled graph per layer over one replica per group.
- `grpc_unary`: `grpc`, unary calls with framed tensors.
- `rdt`: `ray-rdt`, Ray Direct Transport through a relay actor. Not imported here: it imports Ray when loaded
  (its relay's methods are declared with `ray.method`); `from gateway.dispatch.transports.rdt import ...`.
"""

from gateway.dispatch.transports.grpc_unary import GrpcTransport
from gateway.dispatch.transports.interface import DispatchError, ExpertCall, ExpertReply, Transport, take_rows
from gateway.dispatch.transports.local import LocalTransport
from gateway.dispatch.transports.ray_actor import RayTransport, numpy_args
from gateway.dispatch.transports.ray_dag import RayDagTransport
from gateway.dispatch.transports.retrying import SHARE_MIN_BYTES, ReplicaTransport

__all__ = [
    "SHARE_MIN_BYTES", "DispatchError", "ExpertCall", "ExpertReply", "GrpcTransport", "LocalTransport",
    "RayDagTransport", "RayTransport", "ReplicaTransport", "Transport", "numpy_args", "take_rows",
]
