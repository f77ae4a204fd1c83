"""Joining or starting Ray: the one place library and command-line code calls ray.init.

The engine's groups, the balance service, `expertmesh serve`, `stats`, `rebalance` and `plan --calibrate` all come
through `connect_ray`. Benchmarks and the tests' conftest start their own local Ray with an explicit `num_cpus`
(sized for the machine they measure on), which is theirs to choose.
"""

from __future__ import annotations

from gateway.config import DeploymentConfig


def connect_ray(cfg: DeploymentConfig, log_to_driver: bool = False) -> bool:
    """Join cfg.ray_address (cfg.ray.address, else RAY_ADDRESS), or start a new Ray embedded here with
    cfg.embedded_ray_cpus() logical CPUs, in cfg.ray.namespace. Returns whether this call connected (False: Ray
    was already up in this process, and is used as it is). log_to_driver: print the workers' logs here (a
    foreground server wants them; a library call does not)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=log_to_driver)
    else:
        # "local": a new Ray of its own, even where `ray start` left a record of another cluster on this machine
        # (/tmp/ray/ray_current_cluster), which a plain ray.init() would join (refusing num_cpus there).
        ray.init(address="local", num_cpus=cfg.embedded_ray_cpus(), namespace=cfg.ray.namespace,
                 include_dashboard=False, log_to_driver=log_to_driver)
    return True
