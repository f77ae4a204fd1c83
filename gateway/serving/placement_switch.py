"""PlacementSwitch: re-places the routed experts while serving (an operator's placement, or an EPLB proposal)."""

from __future__ import annotations

import contextlib
import logging
import threading

from gateway.dispatch.dispatcher import Dispatcher
from gateway.model.model import GatewayModel
from model_core.spec import ModelSpec
from router_service.placement import Placement

logger = logging.getLogger(__name__)


class PlacementSwitch:
    """Stages a placement on every expert group beside the current one while requests keep flowing, switches the
    dispatcher and the model to it between two steps (`between_steps`, the engine's step lock), then frees what the
    groups no longer need. Answers never change: copies and moves only change where each (token, expert) pair is
    computed. The balancing client hands EPLB proposals to `propose`, which applies them on a thread of its own."""

    def __init__(self, spec: ModelSpec, top_m_devices: int | None, backend: Dispatcher, model: GatewayModel,
                 between_steps: threading.RLock) -> None:
        self.spec, self.top_m_devices = spec, top_m_devices
        self.backend, self.model, self.between_steps = backend, model, between_steps
        self.switched = 0  # placements switched to while serving
        self.failures = 0  # proposals that failed to apply (the old placement kept serving)
        self._background: threading.Thread | None = None
        if backend.pool is not None:  # a mesh offers the placements it decided; a gateway's own pool never does
            backend.pool.follow_placements(self.follow)

    def in_use(self) -> dict:
        """The placement serving now, as the router service reads it."""
        return self.backend.placement.to_dict()

    def apply(self, placement: Placement) -> None:
        """Switch to `placement` (version above the current one); blocks until done. Call it from any thread but
        the one stepping the engine. With a mesh, every attached gateway follows (see `follow`)."""
        placement.check_top_m(self.spec.top_k, self.top_m_devices)
        pool = self.backend.pool
        # No replica starts (scaling, replacement) between staging and the switch: it would load the old placement.
        with pool.placement_change() if pool is not None else contextlib.nullcontext():
            self.backend.stage(placement)
            # A mesh stages one placement per version: when another gateway's proposal of this version got there
            # first, this gateway follows that one (its heartbeat may have taken the offer and not yet switched).
            self.follow(pool.decided(placement) if pool is not None else placement)

    def follow(self, placement: Placement) -> None:
        """Dispatch with `placement` (staged on every group) from the next step on, then free what is no longer
        needed. The mesh's heartbeat calls this when another gateway's change offers a newer placement."""
        with self.between_steps:
            if self.backend.placement.version >= placement.version:
                return  # already switched (this gateway asked for it, and the offer came back)
            placement.check_top_m(self.spec.top_k, self.top_m_devices)
            self.backend.switch(placement)
            self.model.set_placement(placement)
        self.backend.release()
        self.switched += 1
        logger.info("placement version %d in use (%d redundant slots in the first MoE layer)", placement.version,
                    placement.redundant_slots(self.spec.moe_layers[0]))

    def propose(self, placement: dict) -> None:
        """Apply a proposed placement (the router service's wire form) in the background; one at a time."""
        if self._background is not None and self._background.is_alive():
            return
        new = Placement.from_device_lists(placement["devices"], self.spec.n_routed_experts, placement.get("layers"),
                                          self.spec.moe_layers, placement.get("version", 0))
        if new.version <= self.backend.placement.version:
            return  # another gateway of the mesh applied it already, and this one follows

        def run() -> None:
            try:
                self.apply(new)
            except Exception:  # the current placement keeps serving; the next proposal tries again
                self.failures += 1
                logger.exception("re-placement to version %d failed; serving on with version %d", new.version,
                                 self.backend.placement.version)

        self._background = threading.Thread(target=run, name=f"rearrange-v{new.version}", daemon=True)
        self._background.start()

    def wait(self, timeout_s: float = 300.0) -> None:
        """Wait for a re-placement in progress to finish (tests, benchmarks, shutdown)."""
        thread = self._background
        if thread is not None:
            thread.join(timeout_s)
