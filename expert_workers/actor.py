"""ExpertGroupActor: the Ray actor shell around one ExpertGroup, answering Ray calls and (optionally) gRPC."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

from expert_workers.collective import leave_collective_groups
from expert_workers.expert_group import ExpertGroup, select_rows
from expert_workers.merging import CallMerger
from expert_workers.spans import traced_run
from model_core.telemetry import Telemetry, TracingConfig
from protos.channel import RpcSecurity
from protos.codec import DTYPES, numpy_to_tensor, readonly_tensor, tensor_to_numpy

logger = logging.getLogger(__name__)


class ExpertGroupActor:
    """Plain class (testable without Ray); `ray.remote(ExpertGroupActor)` makes the actor.

    Ray calls (forward, forward_packed, the RDT methods, forward_dag) and the gRPC server reach the same
    CallMerger over the group, so every transport computes one function, and calls for the same layer and placement
    version from several gateways are computed in one pass when they wait together. Safe to run threaded (Ray's
    `max_concurrency`, which sizes the default concurrency group beside `watch`): calls then meet in the merger.
    """

    def __init__(
        self,
        model_dir: str,
        expert_ids: list[int],
        dtype: str,
        device: int,
        serve_grpc: bool = True,
        max_message_bytes: int = 256 << 20,
        threads: int = 1,
        kernel: str = "auto",
        half_matmul: str = "auto",
        quantization: str = "auto",
        torch_device: str = "cpu",
        tracing: TracingConfig | None = None,
        grpc_bind: str | None = None,
        joined_cluster: bool = False,
        security: RpcSecurity | None = None,
        layer_experts: dict[int, list[int]] | None = None,
        version: int = 0,
        merge: bool = True,
    ) -> None:
        """grpc_bind, joined_cluster: where the gRPC server binds and what it advertises (`bind_and_advertise`);
        security: its TLS material and shared token (values, not paths: this actor may run on another host);
        layer_experts: {MoE layer: expert ids} for layers whose placement differs from expert_ids (copies);
        version: the placement version they belong to; quantization: how FP8 experts are held (ExpertGroup);
        merge: compute waiting calls of the same layer and version
        in one pass (False: one call per pass, still counted by `merge_stats`)."""
        torch.set_num_threads(max(1, threads))
        self.started_at = time.time()  # a restarted actor reports a new start time
        self.telemetry = Telemetry(tracing or TracingConfig(exporter="none"), f"expert-group-{device}")
        self.group = ExpertGroup(Path(model_dir), expert_ids, dtype=DTYPES[dtype], device=device, kernel=kernel,
                                 torch_device=torch_device, layer_experts=layer_experts, version=version,
                                 half_matmul=half_matmul, quantization=quantization)
        self.merger = CallMerger(self.group, enabled=merge)
        self._stage_lock = threading.Lock()  # guards _staging and _stage_errors (calls may run on several threads)
        self._staging: dict[int, threading.Thread] = {}
        self._stage_errors: dict[int, str] = {}
        self.server = None
        if serve_grpc:
            import ray.util

            from expert_workers.grpc_server import ExpertServer, bind_and_advertise

            bind_host, advertised = bind_and_advertise(grpc_bind, joined_cluster, ray.util.get_node_ip_address())
            self.server = ExpertServer(self.group, max_message_bytes=max_message_bytes, tracer=self.telemetry.tracer,
                                       bind_host=bind_host, advertised_host=advertised, security=security,
                                       merger=self.merger)
            self.server.start()
        logger.info("expert group %d ready: %d experts, %d weight bytes (%s)", device, len(expert_ids),
                    self.group.weight_bytes, self.group.weight_dtype)

    def forward(
        self, layer: int, hidden: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray, hidden_dtype: str,
        carrier: dict[str, str] | None = None, version: int | None = None, rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float]:
        """hidden [T, H] (bfloat16 as int16 bits), expert_ids [T, K], weights [T, K] -> (output, compute ms).

        carrier: the caller's W3C trace context ({'traceparent': ...}), continued by this group's server span;
        version: the placement version the ids follow (None: this group's current one); rows: [T] indices into
        hidden when hidden is the layer's whole batch (read in place from shared memory), None when it holds
        exactly this group's rows.
        """
        h = numpy_to_tensor(hidden, DTYPES[hidden_dtype])
        if rows is not None:
            h = select_rows(h, readonly_tensor(rows))
        ids, w = readonly_tensor(expert_ids), readonly_tensor(weights)
        result = traced_run(self.group, self.telemetry.tracer, carrier, "ray", layer, h, ids, w, version=version,
                            merger=self.merger)
        return tensor_to_numpy(result.output), result.compute_ms

    def forward_packed(self, args: tuple, batch: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """The Ray transport's call: forward's arguments in one tuple (Ray serializes one argument, not seven).

        batch: the layer's whole hidden batch, when the gateway put it in the object store once for every group on
        its node (a top-level ObjectRef, so Ray hands it over as a zero-copy view); args[1] is then this group's
        rows of it, in place of the hidden rows themselves."""
        if batch is None:
            return self.forward(*args)
        layer, rows, expert_ids, weights, hidden_dtype, carrier, version = args
        return self.forward(layer, batch, expert_ids, weights, hidden_dtype, carrier, version, rows=rows)

    def _forward_tensor(self, layer: int, hidden: torch.Tensor, expert_ids: np.ndarray, weights: np.ndarray,
                        carrier: dict[str, str] | None, version: int | None, out_device: str | None = None
                        ) -> tuple[torch.Tensor, float]:
        """The Ray Direct Transport forward: hidden arrives as a tensor (over Gloo, NCCL or CUDA IPC) and the
        output leaves as one, on this group's device (or `out_device`: Gloo carries CPU tensors only)."""
        h = hidden.to(self.group.torch_device)
        ids, w = readonly_tensor(expert_ids), readonly_tensor(weights)
        result = traced_run(self.group, self.telemetry.tracer, carrier, "rdt", layer, h, ids, w, version=version,
                            merger=self.merger)
        out = result.output if out_device is None else result.output.to(out_device)
        return out, result.compute_ms

    # One method per tensor transport: Ray fixes a method's transport when the class is defined.
    @ray.method(tensor_transport="gloo")
    def forward_rdt_gloo(self, layer, hidden, expert_ids, weights, carrier=None, version=None):
        return self._forward_tensor(layer, hidden, expert_ids, weights, carrier, version, out_device="cpu")

    @ray.method(tensor_transport="nccl")
    def forward_rdt_nccl(self, layer, hidden, expert_ids, weights, carrier=None, version=None):
        return self._forward_tensor(layer, hidden, expert_ids, weights, carrier, version)

    @ray.method(tensor_transport="cuda_ipc")
    def forward_rdt_cuda_ipc(self, layer, hidden, expert_ids, weights, carrier=None, version=None):
        return self._forward_tensor(layer, hidden, expert_ids, weights, carrier, version)

    # -- re-placement: a new placement version loads beside the current one ---------------------------------
    def stage_layout(self, version: int, expert_ids: list[int], layer_experts: dict[int, list[int]]) -> None:
        """Start loading placement `version` in a background thread (forward calls keep running); poll
        `layout_ready`."""
        def load() -> None:
            try:
                self.group.stage(version, expert_ids, layer_experts)
            except Exception as exc:  # reported by layout_ready, whole
                logger.exception("expert group %d: loading placement version %d failed", self.group.device, version)
                with self._stage_lock:
                    self._stage_errors[version] = f"{type(exc).__name__}: {exc}"

        with self._stage_lock:
            if version in self.group.versions or version in self._staging:
                return
            self._stage_errors.pop(version, None)
            thread = threading.Thread(target=load, name=f"stage-v{version}", daemon=True)
            self._staging[version] = thread
            thread.start()

    def layout_ready(self, version: int) -> bool:
        """Whether placement `version` is loaded; raises RuntimeError if loading it failed."""
        with self._stage_lock:
            thread = self._staging.get(version)
            if thread is not None and not thread.is_alive():
                self._staging.pop(version, None)
            error = self._stage_errors.get(version)
            staging = version in self._staging
        if error is not None:
            raise RuntimeError(f"expert group {self.group.device}: placement version {version}: {error}")
        return version in self.group.versions and not staging

    def release_layouts(self, keep: int) -> int:
        """Keep only placement `keep` (the gateway switched to it and no call names another); weight bytes left."""
        self.group.release(keep)
        return self.group.weight_bytes

    def adopt_layout(self, version: int, expert_ids: list[int], layer_experts: dict[int, list[int]]) -> dict:
        """Load placement `version` now and keep only it (a restarted actor comes back with the placement it was
        created with); returns `describe()`."""
        if version not in self.group.versions:
            self.group.stage(version, expert_ids, layer_experts)
        self.group.release(version)
        return self.describe()

    def rdt_reset(self) -> None:
        """Leave every collective group, so that the gateway's relay can make a new one over the current replicas."""
        leave_collective_groups()

    @ray.method(concurrency_group="watch")
    def rdt_watch(self) -> None:
        """Never returns while this actor lives: the relay holds the call, and its failure says the actor died
        (Ray would kill both ends of a transfer to the restarted actor over the old group)."""
        threading.Event().wait()

    def forward_dag(self, args: tuple | None) -> tuple[np.ndarray, float] | None:
        """The same forward as a Ray Compiled Graph node: args is forward's arguments, or None (no tokens here)."""
        return None if args is None else self.forward_packed(args)

    def merge_stats(self) -> dict:
        """How this replica's calls met: `CallMerger.stats` (calls, passes, rows per pass, merged share, ...)."""
        return self.merger.stats()

    def memory(self) -> dict:
        """The routed-expert weights this replica holds: bytes (every loaded placement version, FP8 scale tiles
        included) and what they are held as (`ExpertGroup.weight_dtype`)."""
        return {"weight_bytes": self.group.weight_bytes, "weight_dtype": self.group.weight_dtype}

    def reset_merge_stats(self) -> None:
        self.merger.reset_stats()

    def describe(self) -> dict:
        g = self.group
        return {
            "device": g.device,
            "expert_ids": g.expert_ids,
            "layer_experts": g.layer_experts,
            "version": g.version,
            "versions": g.versions,
            "moe_layers": g.spec.moe_layers,
            "weight_bytes": g.weight_bytes,
            "loaded_tensors": sorted(g.reader.loaded),
            "grpc_address": self.server.address if self.server else None,
            "kernel": g.kernel,
            "matmul_dtype": str(g.matmul_dtype).removeprefix("torch."),
            "weight_dtype": g.weight_dtype,
            "started_at": self.started_at,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "torch_device": str(g.torch_device),
            "merge": self.merger.stats(),
        }

    def shutdown(self) -> None:
        """Stop the gRPC server and flush this process's spans (called before the actor is killed)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.telemetry.shutdown()
