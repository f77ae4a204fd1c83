"""gRPC across hosts: where the expert server binds and what it advertises, TLS, and the shared token."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray.util
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expert_workers.grpc_server import SERVICE_NAME, ExpertServer, bind_and_advertise, host_port
from gateway import Engine
from gateway.config import DeploymentConfig, RpcConfig
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos.channel import RpcSecurity, channel_options
from protos.codec import proto_to_tensor
from tests.conftest import random_prompts
from tests.expert_workers.test_grpc_server import TIMEOUT, request, routing

TOKEN = "s3cret-token-4-tests"
# no proxy, whatever the environment says: the tests dial this host's own addresses
OPTIONS = [*channel_options(), ("grpc.enable_http_proxy", 0)]


def _issue(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False, ips=(), names=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName(n) for n in names]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA; a server certificate for IP 127.0.0.1 and one for the name experts.internal only; an
    unrelated CA; a token file. Returns file paths."""
    root = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _issue("expertmesh test CA", ca_key, ca=True)
    files = {
        "ca": _pem(ca),
        "other_ca": _pem(_issue("some other CA", other_key, ca=True)),
        "cert": _pem(_issue("expert group", server_key, ca, ca_key, ips=["127.0.0.1"])),
        "named_cert": _pem(_issue("expert group", server_key, ca, ca_key, names=["experts.internal"])),
        "key": _key_pem(server_key),
        "token": f"  {TOKEN}\n".encode(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def security(pki, token: str | None = TOKEN, cert: str = "cert", ca: str = "ca", server_name=None) -> RpcSecurity:
    return RpcSecurity(tls_cert=pki[cert].read_bytes(), tls_key=pki["key"].read_bytes(), tls_ca=pki[ca].read_bytes(),
                       tls_server_name=server_name, token=token)


def secure_stub(address: str, sec: RpcSecurity) -> tuple[grpc.Channel, pb_grpc.ExpertServiceStub]:
    """A client channel built the way GrpcTransport builds one."""
    channel = grpc.secure_channel(address, sec.channel_credentials(), options=OPTIONS + sec.client_options())
    return channel, pb_grpc.ExpertServiceStub(channel)




@pytest.fixture(scope="module")
def tls_server(group, pki) -> Iterator[ExpertServer]:
    with ExpertServer(group, security=security(pki)) as srv:
        yield srv


def forward(stub, group, metadata, seed: int = 3) -> None:
    """One Forward; its output must equal the in-process group's."""
    hidden, ids, weights = routing(6, seed)
    reply = stub.Forward(request(2, hidden, ids, weights), timeout=TIMEOUT, metadata=metadata)
    assert torch.equal(proto_to_tensor(reply.output, "output"), group.run(2, hidden, ids, weights).output)


# -- where the server binds, and what it advertises ---------------------------------------------------------
@pytest.mark.parametrize(("bind", "joined", "expected"), [
    (None, False, ("127.0.0.1", "127.0.0.1")),  # embedded Ray: everything on this host
    (None, True, ("10.0.0.7", "10.0.0.7")),  # joined a cluster: reachable from the other hosts
    ("0.0.0.0", False, ("0.0.0.0", "10.0.0.7")),  # every interface; clients dial the node's IP
    ("::", True, ("::", "10.0.0.7")),
    ("192.168.1.4", True, ("192.168.1.4", "192.168.1.4")),  # explicit: bound and advertised as given
    ("experts.internal", False, ("experts.internal", "experts.internal")),
])
def test_bind_and_advertise_rule(bind, joined, expected):
    assert bind_and_advertise(bind, joined, "10.0.0.7") == expected


def test_host_port_brackets_ipv6_literals():
    assert host_port("10.0.0.7", 50) == "10.0.0.7:50"
    assert host_port("::1", 50) == "[::1]:50"
    assert host_port("experts.internal", 50) == "experts.internal:50"


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_a_server_with_an_explicit_bind_advertises_the_address_it_answers_on(group, bind):
    node_ip = ray.util.get_node_ip_address()
    bind_host, advertised = bind_and_advertise(bind, True, node_ip)
    with ExpertServer(group, bind_host=bind_host, advertised_host=advertised) as srv:
        assert srv.address == f"{bind if bind != '0.0.0.0' else node_ip}:{srv.port}"
        with grpc.insecure_channel(srv.address, options=OPTIONS) as channel:
            forward(pb_grpc.ExpertServiceStub(channel), group, metadata=None)


def test_a_wildcard_address_is_never_advertised(group):
    with pytest.raises(ValueError, match="wildcard"):
        ExpertServer(group, bind_host="0.0.0.0")


# -- TLS and the token ---------------------------------------------------------------------------------------
def test_tls_and_token_accept_the_right_token_and_reject_others_without_leaking_it(tls_server, group, pki, caplog):
    caplog.set_level(logging.INFO)
    channel, stub = secure_stub(tls_server.address, security(pki))
    with channel:
        forward(stub, group, security(pki).call_metadata(), seed=1)
        for metadata in (None, (("authorization", "Bearer wrong-token"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as err:
                forward(stub, group, metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        forward(stub, group, security(pki).call_metadata(), seed=2)  # still serving
        # health checks stay open: a probe needs no secret
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 4 and "Forward" in rejected[0].getMessage()
    assert not any(TOKEN in r.getMessage() for r in caplog.records)
    assert TOKEN not in repr(security(pki))


def test_a_plaintext_client_cannot_call_the_tls_server(tls_server, group, pki):
    with grpc.insecure_channel(tls_server.address, options=OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as err:
            forward(pb_grpc.ExpertServiceStub(channel), group, security(pki).call_metadata())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_refuses_the_server(tls_server, group, pki):
    channel, stub = secure_stub(tls_server.address, security(pki, ca="other_ca"))
    with channel, pytest.raises(grpc.RpcError) as err:
        forward(stub, group, security(pki).call_metadata())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_issued_to_a_name_is_verified_against_tls_server_name(group, pki):
    with ExpertServer(group, security=security(pki, cert="named_cert")) as srv:
        channel, stub = secure_stub(srv.address, security(pki, server_name="experts.internal"))
        with channel:
            forward(stub, group, security(pki).call_metadata())
        channel, stub = secure_stub(srv.address, security(pki))  # checks 127.0.0.1, which the cert does not list
        with channel, pytest.raises(grpc.RpcError) as err:
            forward(stub, group, security(pki).call_metadata())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# -- end to end -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_engine_over_grpc_with_tls_and_a_token_gives_the_in_process_tokens(model_dirs, pki, ray_cluster):
    path = model_dirs["tiny-v3"]
    prompts = random_prompts(272, [6, 9], seed=5)
    with Engine.from_pretrained(path) as local:
        expected = local.generate(prompts, max_new_tokens=8, stop_at_eos=False)
    rpc = RpcConfig(tls_cert=str(pki["cert"]), tls_key=str(pki["key"]), tls_ca=str(pki["ca"]),
                    token_file=str(pki["token"]))
    with Engine.from_config(DeploymentConfig(model=str(path), backend="grpc", devices=2, rpc=rpc)) as engine:
        assert engine.generate(prompts, max_new_tokens=8, stop_at_eos=False) == expected
        replica = engine.backend.pool.live(1)[0]
        assert replica.grpc_address.startswith("127.0.0.1:")  # embedded Ray: loopback
        channel, stub = secure_stub(replica.grpc_address, security(pki))
        with channel, pytest.raises(grpc.RpcError) as err:  # the actors got the token
            stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
