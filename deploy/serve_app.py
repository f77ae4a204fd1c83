"""The Ray Serve application: one gateway replica running the Engine behind the OpenAI-compatible HTTP API."""

import logging
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from gateway.config import DeploymentConfig, DeploymentConfigError, read_deployment_yaml
from gateway.serving import chat as chat_api
from gateway.serving import completions as completions_api
from gateway.serving import http_api
from gateway.serving.chat import ChatRequest
from gateway.serving.completions import CompletionRequest
from gateway.serving.http_api import GatewayState, ScaleRequest

logger = logging.getLogger(__name__)



def _replica_access() -> http_api.Access:
    """The keys and body limit of the gateway replica serving this request (its ingress app is a copy of `app`,
    so they live on the replica object, not on the app)."""
    return serve.get_replica_context().servable_object.access


app = http_api.create_app(access=_replica_access)


@serve.deployment(name="expertmesh-gateway", num_replicas=1, max_ongoing_requests=1024,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class GatewayDeployment:
    """Starts the engine (and through it the expert-group actors and the router service) in its replica;
    the routes are thin methods over gateway.serving.http_api."""

    def __init__(self, deployment: dict[str, Any], api_key: str | None = None, admin_key: str | None = None) -> None:
        from gateway import Engine
        from gateway.serving.engine_loop import EngineLoop
        from model_core.chat_template import ChatTemplate
        from model_core.tokenizer import load_tokenizer_or_none

        config = DeploymentConfig.from_dict(deployment)
        # build() resolves the keys where the driver runs (its files and environment); else this process's
        self.access = http_api.Access(
            api_key if api_key is not None else config.server.resolved_api_key(),
            admin_key if admin_key is not None else config.server.resolved_admin_key(),
            config.server.max_request_bytes)
        engine = Engine.from_config(config)
        tokenizer = load_tokenizer_or_none(config.model)  # unusable: one warning naming it; token ids still serve
        try:
            chat_template = ChatTemplate.from_dir(config.model)
        except (ValueError, OSError):  # unreadable or unparsable: chat answers 400 naming it, completions serve on
            logger.warning("%s: chat template unusable, /v1/chat/completions is off", config.model, exc_info=True)
            chat_template = None
        self.state = GatewayState(EngineLoop(engine), Path(config.model).name, tokenizer, chat_template)
        logger.info("expertmesh gateway ready: %s, backend=%s, devices=%d, api key %s, admin API %s", config.model,
                    config.backend, config.devices, "required" if self.access.api_key is not None else "off",
                    "on" if self.access.admin_key is not None else "off")

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        return http_api.ready(getattr(self, "state", None))

    @app.get("/v1/models")
    async def models(self) -> dict:
        return http_api.models(self.state)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request, response: Response) -> Any:
        return await completions_api.completions(self.state, body, request.headers, response)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request, response: Response) -> Any:
        return await chat_api.chat_completions(self.state, body, request.headers, response)

    @app.get("/v1/routing/{request_id}")
    async def routing(self, request_id: str) -> Any:
        return http_api.routing(self.state, request_id)

    @app.post("/admin/scale")
    async def scale(self, body: ScaleRequest) -> Any:
        return await http_api.scale(self.state, body)

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        return http_api.metrics(self.state)

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is not None:
            state.engine_loop.close()  # closes the engine only once no step runs any more (logs why not)


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run deploy.serve_app:build config=...` and Serve config files.

    args: {"config": "path/to/deployment.yaml"} and/or {"deployment": {...inline settings...}}.
    """
    deployment: dict[str, Any] = {}
    if "config" in args:
        deployment.update(read_deployment_yaml(args["config"]))
    deployment.update(args.get("deployment", {}))
    config = DeploymentConfig.from_dict(deployment)  # fail here, with the field named, not inside a replica
    check_deployable(config)
    # The driver's files and EXPERTMESH_API_KEY / EXPERTMESH_ADMIN_KEY: the replica may lack them.
    keys = config.server.resolved_api_key(), config.server.resolved_admin_key()
    return GatewayDeployment.options(ray_actor_options=gateway_actor_options(config)).bind(deployment, *keys)


def check_deployable(config: DeploymentConfig) -> None:
    """Refuse here, naming the path or setting, what the replica would otherwise fail on after it started (or wait
    for forever): the model's config.json, its weight files and their tensor names (headers only), the placement
    file against the model, and the gateway's GPU. The checkpoint sits at the same path on every node
    (docs/cluster.md), so the driver can read it too."""
    from gateway.serving.placement_switch import initial_placement
    from model_core.checkpoint import CheckpointReader
    from model_core.spec import ModelSpec

    spec = ModelSpec.from_dir(config.model)
    CheckpointReader.for_model(config.model, spec)  # the files exist and hold what config.json implies
    initial_placement(config, spec)
    device = config.gateway_torch_device
    if device.type != "cuda":
        return
    if device.index not in (None, 0):
        raise DeploymentConfigError(f"gateway_device={config.gateway_device!r}: the gateway replica is granted one "
                                    "GPU, which it sees as cuda:0; use 'cuda'")
    import ray

    if ray.is_initialized() and config.ray_address is None and not ray.cluster_resources().get("GPU"):
        # An embedded Ray's resources are fixed: the replica would wait for a GPU forever. (A cluster joined by
        # address may still add GPU nodes.)
        raise DeploymentConfigError(f"gateway_device={config.gateway_device!r}: the embedded Ray has no GPU for the "
                                    "gateway replica (use 'auto' or 'cpu', or join a cluster with GPUs)")


def gateway_actor_options(config: DeploymentConfig) -> dict[str, Any]:
    """The gateway replica's Ray resources: one GPU when its device resolves to CUDA, none otherwise.

    Ray sets the replica's CUDA_VISIBLE_DEVICES to the GPU it grants, which the replica sees as 'cuda' (cuda:0).
    'auto' resolves where build() runs: a driver that sees no GPU asks for none, and the replica, seeing none
    either, stays on the CPU; name 'cuda' to get a GPU replica from a GPU-less driver."""
    gpus = 1 if config.gateway_torch_device.type == "cuda" else 0
    return {"num_cpus": 0, "num_gpus": gpus}
