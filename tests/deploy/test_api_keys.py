"""API and admin keys, and the body limit: /v1/* answers 401 in OpenAI's error shape without `Authorization:
Bearer <API key>`, /admin/* without the admin key (403 while none is configured), a body over the limit 413;
keys are compared in constant time and never echoed, /health, /ready and /metrics stay open, and the settings
are validated with the field named."""

from __future__ import annotations

import json
import socket

import pytest
import requests
from fastapi.testclient import TestClient

from gateway.config import ADMIN_KEY_ENV, API_KEY_ENV, DeploymentConfig, DeploymentConfigError, ServerConfig
from gateway.serving import http_api
from gateway.serving.http_api import Access, ScaleRequest, authorize, create_app

KEY = "sk-test-0123456789"
ADMIN = "sk-admin-9876543210"


def app_with_routes(key: str | None, admin: str | None = ADMIN, limit: int = 4 << 20) -> TestClient:
    """The real app (middleware, 400 handler) with stand-in routes at the real paths."""
    app = create_app(access=lambda: Access(key, admin, limit))

    @app.post("/v1/echo")
    async def echo(body: dict) -> dict:
        return {"bytes": len(json.dumps(body))}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> str:
        return "expertmesh_steps_total 0"

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": []}

    @app.post("/admin/scale")
    async def scale(body: ScaleRequest) -> dict:
        return {"group": body.group, "replicas": body.replicas}

    return TestClient(app)


def assert_401(response, message: str) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_api_key"
    assert message in body["error"]["message"]


@pytest.mark.parametrize("path,method", [("/v1/models", "get"), ("/admin/scale", "post"), ("/v1/nope", "get")])
def test_protected_routes_answer_401_without_the_key_or_with_a_wrong_one(path, method):
    client = app_with_routes(KEY)
    call = getattr(client, method)
    kwargs = {"json": {"group": 0, "replicas": 2}} if method == "post" else {}
    assert_401(call(path, **kwargs), "missing API key")
    assert_401(call(path, headers={"Authorization": KEY}, **kwargs), "missing API key")  # no Bearer scheme
    wrong = call(path, headers={"Authorization": "Bearer sk-wrong"}, **kwargs)
    assert_401(wrong, "incorrect API key")
    assert "sk-wrong" not in wrong.text and KEY not in wrong.text and ADMIN not in wrong.text  # no key is echoed


def test_the_right_key_passes_and_the_scheme_is_case_insensitive():
    client = app_with_routes(KEY)
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    r = client.post("/admin/scale", json={"group": 1, "replicas": 3}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json() == {"group": 1, "replicas": 3}


def test_admin_routes_take_the_admin_key_only_and_are_off_without_one():
    client = app_with_routes(KEY)
    body = {"group": 0, "replicas": 2}
    assert_401(client.post("/admin/scale", json=body, headers={"Authorization": f"Bearer {KEY}"}),
               "incorrect API key")  # the API key opens /v1/*, not /admin/*
    assert_401(client.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}), "incorrect API key")
    for off in (app_with_routes(KEY, admin=None), app_with_routes(None, admin=None)):
        r = off.post("/admin/scale", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert "server.admin_key" in r.json()["error"]["message"]


def test_the_key_is_checked_before_the_body_is_validated():
    client = app_with_routes(KEY)
    assert_401(client.post("/admin/scale", json={"group": -1}), "missing API key")  # not a 400 about the body
    r = client.post("/admin/scale", json={"group": -1}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 400 and "group" in r.json()["error"]["message"]


def test_a_body_over_the_limit_gets_413_before_it_is_parsed_and_others_pass():
    client = app_with_routes(None, limit=2048)
    ok = client.post("/v1/echo", json={"prompt": "x" * 1000})
    assert ok.status_code == 200 and ok.json()["bytes"] > 1000  # the body the app read is the one sent
    big = client.post("/v1/echo", json={"prompt": "x" * 4000})
    assert big.status_code == 413 and "server.max_request_bytes=2048" in big.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b" " * 1000
        yield b'{"a": 1}'

    streamed = client.post("/v1/echo", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert client.post("/v1/echo", json={"a": 1}).status_code == 200


def test_health_ready_and_metrics_stay_open():
    client = app_with_routes(KEY)
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path).status_code == 200


def test_without_an_api_key_the_v1_routes_are_open():
    client = app_with_routes(None)
    assert client.get("/v1/models").status_code == 200
    assert client.post("/admin/scale", json={"group": 0, "replicas": 1},
                       headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_the_key_is_compared_in_constant_time(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = http_api.hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(http_api.hmac, "compare_digest", recording)
    assert authorize(KEY, f"Bearer {KEY}") is None
    assert authorize(KEY, "Bearer sk-wrong").status_code == 401
    assert authorize(KEY, "Bearer sk-tëst").status_code == 401  # non-ASCII is compared as bytes, not a TypeError
    assert compared == [(KEY.encode(), KEY.encode()), (b"sk-wrong", KEY.encode()),
                        ("sk-tëst".encode(), KEY.encode())]


def test_no_configured_key_lets_every_request_through():
    assert authorize(None, None) is None and authorize(None, "Bearer anything") is None


def test_the_serve_app_guards_its_routes_with_the_replicas_access():
    from deploy.serve_app import _replica_access, app

    guards = [m for m in app.user_middleware if m.cls is http_api.RequestGuard]
    assert len(guards) == 1 and guards[0].kwargs["access"] is _replica_access


# --- where the key comes from --------------------------------------------------------------------------------


def test_the_key_comes_from_the_setting_its_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert ServerConfig().resolved_api_key() is None
    assert ServerConfig(api_key=KEY).resolved_api_key() == KEY
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    assert ServerConfig(api_key_file=str(key_file)).resolved_api_key() == KEY  # surrounding whitespace ignored
    monkeypatch.setenv(API_KEY_ENV, "sk-from-env")
    assert ServerConfig().resolved_api_key() == "sk-from-env"
    assert ServerConfig(api_key=KEY).resolved_api_key() == KEY  # the deployment's setting wins
    cfg = DeploymentConfig.from_dict({"model": "m", "server": {"api_key_file": str(key_file)}})
    assert cfg.server.resolved_api_key() == KEY
    assert KEY not in repr(cfg) and KEY not in repr(ServerConfig(api_key=KEY))


def test_the_admin_key_comes_from_its_setting_its_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert ServerConfig().resolved_admin_key() is None  # the API key never doubles as the admin key
    assert ServerConfig(admin_key=ADMIN).resolved_admin_key() == ADMIN
    key_file = tmp_path / "admin"
    key_file.write_text(ADMIN + "\n")
    assert ServerConfig(admin_key_file=str(key_file)).resolved_admin_key() == ADMIN
    monkeypatch.setenv(ADMIN_KEY_ENV, "sk-admin-env")
    assert ServerConfig().resolved_admin_key() == "sk-admin-env"
    assert ADMIN not in repr(ServerConfig(admin_key=ADMIN))


@pytest.mark.parametrize("server,message", [
    ({"api_key": KEY, "api_key_file": "k"}, "server.api_key, server.api_key_file: set one, not both"),
    ({"api_key": 123}, "server.api_key: expected a string, got int"),
    ({"api_key": "has space"}, "server.api_key: the API key must be non-empty printable ASCII"),
    ({"api_key": ""}, "server.api_key: the API key must be non-empty"),
    ({"api_key_file": "/nonexistent/key"}, "server.api_key_file=/nonexistent/key: cannot read"),
    ({"api_keys": KEY}, "server.api_keys: unknown setting"),
    ({"admin_key": ADMIN, "admin_key_file": "k"}, "server.admin_key, server.admin_key_file: set one, not both"),
    ({"admin_key": "a b"}, "server.admin_key: the admin key must be non-empty printable ASCII"),
    ({"max_request_bytes": 10}, "server.max_request_bytes=10: expected an integer >= 1024"),
])
def test_bad_key_settings_name_the_field(server, message):
    with pytest.raises(DeploymentConfigError) as info:
        DeploymentConfig.from_dict({"model": "m", "server": server})
    assert message in str(info.value)
    assert KEY not in str(info.value)


def test_an_empty_key_file_or_a_bad_environment_key_names_its_source(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(DeploymentConfigError, match="server.api_key_file: the API key must be non-empty"):
        ServerConfig(api_key_file=str(empty))
    monkeypatch.setenv(API_KEY_ENV, "two words")
    with pytest.raises(DeploymentConfigError, match=f"{API_KEY_ENV}: the API key must be"):
        ServerConfig().resolved_api_key()


# --- the real server ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_serve_requires_the_key_from_the_drivers_environment(model_dirs, ray_cluster, monkeypatch, tmp_path):
    """EXPERTMESH_API_KEY is read where build() runs and reaches the replica; traced answers carry x-trace-id."""
    from ray import serve

    from deploy.serve_app import build

    monkeypatch.setenv(API_KEY_ENV, KEY)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deployment = {"model": str(model_dirs["tiny-v3"]),
                  "tracing": {"exporter": "jsonl", "jsonl_dir": str(tmp_path / "spans")}}
    try:
        serve.run(build({"deployment": deployment}), name="expertmesh-keys", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
        denied = requests.post(f"{url}/v1/completions", json=body, timeout=60)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        # No admin key configured: the admin routes are off, whatever key is sent.
        assert requests.post(f"{url}/admin/scale", json={"group": 0, "replicas": 2}, timeout=60,
                             headers={"Authorization": f"Bearer {KEY}"}).status_code == 403
        assert requests.get(f"{url}/health", timeout=60).status_code == 200
        assert requests.get(f"{url}/metrics", timeout=60).status_code == 200
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        ok = requests.post(f"{url}/v1/completions", json=body, timeout=120,
                           headers={"Authorization": f"Bearer {KEY}", "traceparent": f"00-{trace_id}-{parent}-01"})
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 2
        assert ok.headers["x-trace-id"] == trace_id
        with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=120,
                           headers={"Authorization": f"Bearer {KEY}"}) as streamed:
            assert streamed.status_code == 200 and len(streamed.headers["x-trace-id"]) == 32
            lines = [line for line in streamed.iter_lines() if line]
        assert lines[-1] == b"data: [DONE]" and json.loads(lines[-2].removeprefix(b"data: "))["choices"]
    finally:
        serve.delete("expertmesh-keys")
        serve.shutdown()
