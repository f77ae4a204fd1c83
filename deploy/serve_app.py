"""The Ray Serve application: gateway replicas (server.replicas, or Serve's autoscaling), each running its own Engine
behind the OpenAI-compatible HTTP API, each response naming the gateway that answered; the HTTP ingress is the front
(deploy/serve_front.py), which relays every request to a gateway so that one dying ends only its own requests."""

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve.exceptions import RayServeException

from deploy.serve_front import GATEWAY_HEADER, FrontDeployment, RelayRequest, ResponseStart, relay_asgi
from gateway.config import MESH_BACKENDS, DeploymentConfig, DeploymentConfigError, read_deployment_yaml
from gateway.config.endpoints import ServerConfig
from gateway.serving import chat as chat_api
from gateway.serving import completions as completions_api
from gateway.serving import http_api
from gateway.serving.chat import ChatRequest
from gateway.serving.completions import CompletionRequest
from gateway.serving.http_api import GatewayState, ScaleRequest

logger = logging.getLogger(__name__)


def _replica_access() -> http_api.Access:
    """The keys and body limit of the gateway replica serving this request (they live on the replica object)."""
    return serve.get_replica_context().servable_object.access


def _serve_replica_id() -> str | None:
    """This Serve replica's id, '<app>#expertmesh-gateway#<unique id>'; None where the class is built outside Serve."""
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except RayServeException:
        return None


def _replica_name() -> str | None:
    """The Serve replica id of the gateway serving this request; None where its object has none (a class built
    outside Serve, the tests' in-process stand-in)."""
    return getattr(serve.get_replica_context().servable_object, "gateway_name", None)


class GatewayHeader:
    """ASGI middleware: every response carries `x-expertmesh-gateway: <replica id>`, so a client of N gateways sees
    which one answered (whose scheduler, caches, metrics and routing traces it met). Pure ASGI, like RequestGuard:
    streamed bodies and client disconnects pass through untouched."""

    def __init__(self, app: Callable[..., Awaitable[None]], name: Callable[[], str | None]) -> None:
        self.app, self.name = app, name

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        name = self.name() if scope["type"] == "http" else None
        if name is None:
            await self.app(scope, receive, send)
            return

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (GATEWAY_HEADER.encode(),
                                                                                 name.encode("latin-1"))]}
            await send(message)

        await self.app(scope, receive, send_named)


app = http_api.create_app(access=_replica_access)
app.add_middleware(GatewayHeader, name=_replica_name)  # outermost: 401s and 413s name the gateway too
_internal_error = app.exception_handlers[Exception]


@app.exception_handler(Exception)
async def _named_internal_error(request: Request, exc: Exception) -> Response:
    """A bug's 500 is written outside every middleware (by Starlette's ServerErrorMiddleware): name the gateway."""
    response = await _internal_error(request, exc)
    name = _replica_name()
    if name is not None:
        response.headers[GATEWAY_HEADER] = name
    return response


def _gateway() -> Any:
    """The gateway replica serving this request (the routes run in its process, called by its `relay`)."""
    return serve.get_replica_context().servable_object


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@app.get("/ready")
async def ready() -> JSONResponse:
    return http_api.ready(getattr(_gateway(), "state", None))


@app.get("/v1/models")
async def models() -> dict:
    return http_api.models(_gateway().state)


@app.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, response: Response) -> Any:
    return await completions_api.completions(_gateway().state, body, request.headers, response)


@app.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, response: Response) -> Any:
    return await chat_api.chat_completions(_gateway().state, body, request.headers, response)


@app.get("/v1/routing/{request_id}")
async def routing(request_id: str) -> Any:
    return http_api.routing(_gateway().state, request_id)


@app.post("/admin/scale")
async def scale(body: ScaleRequest) -> Any:
    return await http_api.scale(_gateway().state, body)


@app.get("/metrics")
async def metrics() -> PlainTextResponse:
    return http_api.metrics(_gateway().state)


# Replicas (num_replicas or autoscaling_config) and resources come from the config, in build().
@serve.deployment(name="expertmesh-gateway", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class GatewayDeployment:
    """Starts the engine (and through it the expert-group actors and the router service) in its replica and
    answers the front's relayed requests with `app` (routes: thin functions over gateway.serving.http_api)."""

    def __init__(self, deployment: dict[str, Any], api_key: str | None = None, admin_key: str | None = None) -> None:
        from gateway import Engine
        from gateway.serving.engine_loop import EngineLoop
        from model_core.chat_template import ChatTemplate
        from model_core.tokenizer import load_tokenizer_or_none

        self.gateway_name = _serve_replica_id()  # x-expertmesh-gateway
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
        logger.info("expertmesh gateway %s ready: %s, backend=%s, devices=%d, api key %s, admin API %s",
                    self.gateway_name, config.model, config.backend, config.devices,
                    "required" if self.access.api_key is not None else "off",
                    "on" if self.access.admin_key is not None else "off")

    async def relay(self, request: RelayRequest) -> AsyncIterator[ResponseStart | bytes]:
        """One HTTP request from the front, answered by this replica's app in process: the response's start, then
        its body bytes (the front streams them to the client; it ends them with an error if this replica dies)."""
        async for item in relay_asgi(app, request):
            yield item

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is not None:
            state.engine_loop.close()  # closes the engine only once no step runs any more (logs why not)


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run deploy.serve_app:build config=...` and Serve config files.

    args: {"config": "path/to/deployment.yaml"} and/or {"deployment": {...inline settings...}}; an inline section
    (`server: {replicas: 2}`) changes the file's section key by key.
    """
    deployment: dict[str, Any] = read_deployment_yaml(args["config"]) if "config" in args else {}
    for name, value in (args.get("deployment") or {}).items():
        section = deployment.get(name)
        both = isinstance(section, dict) and isinstance(value, dict)
        deployment[name] = {**section, **value} if both else value
    config = DeploymentConfig.from_dict(deployment)  # fail here, with the field named, not inside a replica
    if config.backend in MESH_BACKENDS and config.mesh.name is None:
        # Every gateway replica (and one Serve restarts) attaches to one mesh; it goes when the app's gateways go.
        deployment["mesh"] = {**(deployment.get("mesh") or {}), "name": f"serve-{uuid.uuid4().hex[:8]}",
                              "stop_with_last_gateway": True}
        config = DeploymentConfig.from_dict(deployment)
    check_deployable(config)
    # The driver's files and EXPERTMESH_API_KEY / EXPERTMESH_ADMIN_KEY: the replica may lack them.
    keys = config.server.resolved_api_key(), config.server.resolved_admin_key()
    gateways = GatewayDeployment.options(ray_actor_options=gateway_actor_options(config),
                                         **gateway_replicas(config.server)).bind(deployment, *keys)
    # As many fronts as gateways always run: a front only relays bytes, far less work than a gateway's.
    return FrontDeployment.options(num_replicas=config.server.fewest_gateways).bind(
        gateways, config.server.max_request_bytes)


def gateway_of(application: serve.Application) -> Any:
    """The gateway deployment (its replicas, resources and init args) of an application build() returned."""
    return application._bound_deployment.init_args[0]._bound_deployment


def gateway_replicas(server: ServerConfig) -> dict[str, Any]:
    """The gateway deployment's replica options: num_replicas=server.replicas, or Serve's autoscaling_config when
    server.max_replicas is set."""
    if not server.autoscaled:
        return {"num_replicas": server.replicas}
    autoscaling = {"min_replicas": server.fewest_gateways, "max_replicas": server.max_replicas}
    if server.target_ongoing_requests is not None:
        autoscaling["target_ongoing_requests"] = server.target_ongoing_requests
    return {"autoscaling_config": autoscaling}


def check_deployable(config: DeploymentConfig) -> None:
    """Refuse here, naming the path or setting, what the replica would otherwise fail on after it started (or wait
    for forever): the model's config.json, its weight files and their tensor names (headers only), the placement
    file against the model, and the gateway's GPU. The checkpoint sits at the same path on every node
    (docs/cluster.md), so the driver can read it too."""
    from gateway.dispatch.first_placement import initial_placement
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

    if not ray.is_initialized() or config.ray_address is not None:
        return  # a cluster joined by address may still add GPU nodes
    # An embedded Ray's resources are fixed: a gateway without a GPU would wait for one forever.
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if not gpus:
        raise DeploymentConfigError(f"gateway_device={config.gateway_device!r}: the embedded Ray has no GPU for the "
                                    "gateway replica (use 'auto' or 'cpu', or join a cluster with GPUs)")
    server = config.server
    per_gpu = int(1 / server.gpus_per_gateway + 1e-9)  # Ray packs fractions GPU by GPU, never across two
    if server.fewest_gateways > gpus * per_gpu:
        count = (f"server.min_replicas={server.fewest_gateways}" if server.autoscaled
                 else f"server.replicas={server.replicas}")
        raise DeploymentConfigError(f"{count}: the embedded Ray's {gpus} GPU(s) hold {gpus * per_gpu} gateways of "
                                    f"server.gpus_per_gateway={server.gpus_per_gateway:g} (use fewer gateways or "
                                    "a smaller gpus_per_gateway)")


def gateway_actor_options(config: DeploymentConfig) -> dict[str, Any]:
    """Each gateway replica's Ray resources: server.gpus_per_gateway of a GPU (default one whole GPU) when its device
    resolves to CUDA, none otherwise.

    Ray sets the replica's CUDA_VISIBLE_DEVICES to the GPU it grants, which the replica sees as 'cuda' (cuda:0).
    'auto' resolves where build() runs: a driver that sees no GPU asks for none, and the replica, seeing none
    either, stays on the CPU; name 'cuda' to get a GPU replica from a GPU-less driver."""
    gpus = config.server.gpus_per_gateway if config.gateway_torch_device.type == "cuda" else 0
    return {"num_cpus": 0, "num_gpus": gpus}
