"""rpc settings for gRPC across hosts: bind address, TLS files and the shared token, checked where they are read."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import DeploymentConfig, DeploymentConfigError, RpcConfig

CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
TOKEN = "tok-3141592653"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """PEM-shaped files (their contents are only checked by TLS itself) and a token file."""
    paths = {"cert": CERT, "key": KEY, "ca": CERT, "token": f"{TOKEN}\n".encode()}
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    return {name: str(tmp_path / name) for name in paths}


def tls(files, **overrides) -> dict[str, str]:
    return {"tls_cert": files["cert"], "tls_key": files["key"], "tls_ca": files["ca"], **overrides}


def test_tls_files_and_token_file_are_read_into_the_security_settings(files):
    sec = RpcConfig(**tls(files), token_file=files["token"], tls_server_name="experts.internal").security()
    assert (sec.tls_cert, sec.tls_key, sec.tls_ca, sec.token) == (CERT, KEY, CERT, TOKEN)
    assert sec.client_options() == [("grpc.enable_http_proxy", 0),
                                    ("grpc.ssl_target_name_override", "experts.internal")]
    assert sec.call_metadata() == (("authorization", f"Bearer {TOKEN}"),)


def test_defaults_are_plaintext_without_a_token():
    sec = RpcConfig().security()
    assert not sec.tls and sec.call_metadata() == () and sec.client_options() == [("grpc.enable_http_proxy", 0)]


@pytest.mark.parametrize("field", ["tls_cert", "tls_key", "tls_ca"])
def test_a_missing_tls_file_names_its_setting(files, field):
    with pytest.raises(DeploymentConfigError, match=rf"rpc\.{field}=.*/nowhere\.pem: cannot read"):
        RpcConfig(**tls(files, **{field: "/nowhere.pem"}))


def test_an_unreadable_tls_file_names_its_setting(files, tmp_path):
    with pytest.raises(DeploymentConfigError, match=r"rpc\.tls_ca=.*: cannot read"):
        RpcConfig(**tls(files, tls_ca=str(tmp_path)))  # a directory


@pytest.mark.parametrize("field", ["tls_cert", "tls_key", "tls_ca"])
def test_tls_needs_cert_key_and_ca_together(files, field):
    settings = tls(files)
    del settings[field]
    with pytest.raises(DeploymentConfigError, match=rf"rpc\.{field}: missing"):
        RpcConfig(**settings)


def test_a_swapped_key_and_cert_are_caught(files):
    with pytest.raises(DeploymentConfigError, match=r"rpc\.tls_key=.*not a PEM file with a PRIVATE KEY"):
        RpcConfig(**tls(files, tls_key=files["cert"]))


def test_tls_server_name_needs_tls():
    with pytest.raises(DeploymentConfigError, match=r"rpc\.tls_server_name"):
        RpcConfig(tls_server_name="experts.internal")


def test_token_and_token_file_are_exclusive(files):
    with pytest.raises(DeploymentConfigError, match=r"rpc\.token, rpc\.token_file: set one"):
        RpcConfig(token=TOKEN, token_file=files["token"])


def test_a_missing_token_file_names_its_setting():
    with pytest.raises(DeploymentConfigError, match=r"rpc\.token_file=/no/token: cannot read"):
        RpcConfig(token_file="/no/token")


@pytest.mark.parametrize("token", ["", "has space", "tab\there", "naïve"])
def test_a_bad_token_is_refused_without_echoing_it(token, tmp_path):
    with pytest.raises(DeploymentConfigError, match=r"rpc\.token: the token must be") as err:
        RpcConfig(token=token)
    assert token.strip() == "" or token not in str(err.value)
    (tmp_path / "t").write_text(token)
    with pytest.raises(DeploymentConfigError, match=r"rpc\.token_file: the token must be") as err:
        RpcConfig(token_file=str(tmp_path / "t"))
    assert token.strip() == "" or token not in str(err.value)


def test_the_token_stays_out_of_the_config_repr():
    cfg = DeploymentConfig(model="m", rpc=RpcConfig(token=TOKEN))
    assert TOKEN not in repr(cfg) and TOKEN not in repr(cfg.rpc.security())


@pytest.mark.parametrize("bind", [None, "0.0.0.0", "::", "10.0.0.7", "fd00::7", "experts.internal"])
def test_bind_accepts_hosts(bind):
    assert RpcConfig(bind=bind).bind == bind


@pytest.mark.parametrize("bind", ["", "10.0.0.7:50051", "[::1]:50051", "a host", 7])
def test_bind_refuses_ports_and_non_hosts(bind):
    with pytest.raises(DeploymentConfigError, match=r"rpc\.bind="):
        RpcConfig(bind=bind)


def test_the_deployment_file_carries_the_rpc_security_settings(files, tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(f"model: m\nbackend: grpc\nrpc:\n  bind: 0.0.0.0\n  tls_cert: {files['cert']}\n"
                    f"  tls_key: {files['key']}\n  tls_ca: {files['ca']}\n  token_file: {files['token']}\n")
    cfg = DeploymentConfig.from_yaml(path)
    assert cfg.rpc.bind == "0.0.0.0" and cfg.rpc.security().tls and cfg.rpc.security().token == TOKEN
    path.write_text(f"model: m\nrpc:\n  tls_cert: {tmp_path / 'gone.pem'}\n  tls_key: {files['key']}\n"
                    f"  tls_ca: {files['ca']}\n")
    with pytest.raises(DeploymentConfigError, match=r"deploy\.yaml: rpc\.tls_cert=.*gone\.pem: cannot read"):
        DeploymentConfig.from_yaml(path)
