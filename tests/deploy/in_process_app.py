"""The real HTTP app of deploy/serve_app.py (its routes, middleware and error handlers) served in this process
over an Engine, without Ray Serve: the routes' `self` (the gateway replica) is resolved through
`serve.get_replica_context()`, which `in_process_app` answers with a stand-in holding the GatewayState."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway import Engine
from gateway.config import DeploymentConfig
from gateway.serving.engine_loop import EngineLoop
from gateway.serving.http_api import Access, GatewayState
from model_core.chat_template import ChatTemplate
from model_core.tokenizer import load_tokenizer


@contextlib.contextmanager
def in_process_app(model_dir: Path, **settings: Any) -> Iterator[tuple[Any, GatewayState]]:
    """(deploy.serve_app.app, its GatewayState) over an engine started with `settings` (DeploymentConfig
    overrides, dotted names allowed); the engine loop runs until the block ends."""
    from ray import serve

    from deploy.serve_app import app

    config = DeploymentConfig(model=str(model_dir)).with_overrides(**settings)
    engine = Engine.from_config(config)
    loop = EngineLoop(engine)
    state = GatewayState(loop, model_dir.name, load_tokenizer(model_dir), ChatTemplate.from_dir(model_dir))
    replica = SimpleNamespace(state=state, access=Access(max_request_bytes=config.server.max_request_bytes))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica))
            yield app, state
    finally:
        loop.close()


def client_of(app: Any) -> TestClient:
    """A TestClient that answers a server error with its 500 (as a real client sees it), not by raising; used as a
    context manager, it serves requests from several threads at once on one event loop."""
    return TestClient(app, raise_server_exceptions=False)


def raw_json(body: Any) -> dict:
    """Keyword arguments sending `body` as JSON text the way any client may: \\ud800 escapes (lone surrogates) and
    NaN / Infinity literals included, which the client's own json= refuses to write."""
    return {"content": json.dumps(body).encode("ascii"), "headers": {"content-type": "application/json"}}


def sse_events(text: str) -> list[dict]:
    """The JSON events of a server-sent-events body, [DONE] left out."""
    return [json.loads(line.removeprefix("data: ")) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def assert_openai_error(response: Any, status: int, *words: str) -> dict:
    """The response is `status` with OpenAI's error body ({"error": {message, type, param, code}}) whose message
    has every word; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    for word in words:
        assert word in body["error"]["message"], (word, body)
    return body["error"]
