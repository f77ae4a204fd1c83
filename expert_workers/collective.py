"""Leaving Ray collective groups, so an actor can join a new group (the gateway's RDT relay rebuilds them)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def leave_collective_groups() -> None:
    """Leave every collective group this process is in, so that it can join a new one.

    Ray's torch_gloo groups initialise torch.distributed's default process group once per process, with the
    first group's members, and never again: a group over other members (a restarted or new expert actor)
    rendezvous-times-out unless every member tears that down first. Uses Ray's per-process group manager."""
    from ray.util.collective import collective

    with collective._group_mgr_lock:
        for name in list(collective._group_mgr._name_group_map):
            try:
                collective._group_mgr.destroy_collective_group(name)
            except Exception as exc:  # a group a dead peer already broke: dropping it is all that matters
                logger.info("leaving collective group %s: %s", name, f"{type(exc).__name__}: {exc}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
