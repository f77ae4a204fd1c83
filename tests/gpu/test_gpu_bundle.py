"""The GPU check's wheel bundle (benchmarks/gpu_bundle.py): a stripped wheel stays installable (RECORD lists exactly
its members, permissions kept), and the bundle carries the protobuf and grpcio that the generated stubs require."""

from __future__ import annotations

import importlib.util
import re
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def gpu_bundle():
    spec = importlib.util.spec_from_file_location("gpu_bundle_under_test", ROOT / "benchmarks" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def make_wheel(path: Path) -> None:
    """A wheel shaped like Ray's: a package, an executable binary, jars and a dashboard build to strip."""
    members = {"ray/__init__.py": b"x = 1\n", "ray/core/src/ray/raylet/raylet": b"\x7fELF",
               "ray/jars/ray_dist.jar": b"j" * 1000, "ray/dashboard/client/build/index.html": b"<html>",
               "ray/dashboard/modules/job.py": b"y = 2\n", "ray/rllib/algo.py": b"z = 3\n"}
    record = "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in members.items())
    record += "ray-1.0.dist-info/METADATA,,\nray-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith("raylet") else 0o644) << 16
            z.writestr(info, data)
        z.writestr("ray-1.0.dist-info/METADATA", "Name: ray\nVersion: 1.0\n")
        z.writestr("ray-1.0.dist-info/RECORD", record)


def test_stripping_a_wheel_drops_the_members_and_their_record_lines_and_keeps_permissions(tmp_path, gpu_bundle):
    src, dst = tmp_path / "ray-1.0-cp312-cp312-manylinux2014_x86_64.whl", tmp_path / "out.whl"
    make_wheel(src)
    info = gpu_bundle.strip_wheel(src, dst, gpu_bundle.RAY_STRIP)
    assert info["members_removed"] == 3
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        assert names == {"ray/__init__.py", "ray/core/src/ray/raylet/raylet", "ray/dashboard/modules/job.py",
                         "ray-1.0.dist-info/METADATA", "ray-1.0.dist-info/RECORD"}
        listed = {line.split(",")[0] for line in z.read("ray-1.0.dist-info/RECORD").decode().splitlines()}
        assert listed == names  # pip installs exactly what RECORD lists
        assert (z.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16) & 0o777 == 0o755
        assert z.read("ray/__init__.py") == b"x = 1\n"


def test_pins_are_read_from_the_constraints_file(tmp_path, gpu_bundle):
    constraints = tmp_path / "c.txt"
    constraints.write_text("# comment\nray==2.60.0\nrpds-py==2026.9.1\nPyYAML==6.0.4\nloose>=1\n")
    assert gpu_bundle.pinned_versions(constraints) == {"ray": "2.60.0", "rpds-py": "2026.9.1", "pyyaml": "6.0.4"}
    assert gpu_bundle.wheel_name_version(Path("rpds_py-2026.9.1-cp312-cp312-manylinux_2_17_x86_64.whl")) == (
        "rpds-py", "2026.9.1")


def test_the_bundle_carries_protobuf_and_grpcio_at_versions_the_generated_stubs_accept(gpu_bundle):
    """protos/expert_service_pb2.py refuses a protobuf runtime of another major or an older minor; *_pb2_grpc.py
    refuses an older grpcio. The GPU image's versions are unknown, so the bundle carries the tested pins."""
    stub = (ROOT / "protos" / "expert_service_pb2.py").read_text()
    major, minor, patch = map(int, re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", stub).groups())
    grpc_stub = (ROOT / "protos" / "expert_service_pb2_grpc.py").read_text()
    grpc_min = tuple(map(int, re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub)[1].split(".")))
    pins = gpu_bundle.pinned_versions(ROOT / "constraints.txt")
    carried = set(gpu_bundle.PACKAGES)
    assert {"protobuf", "grpcio", "grpcio-health-checking", "ray", "jsonschema"} <= carried
    protobuf = tuple(map(int, pins["protobuf"].split(".")[:3]))
    assert protobuf[0] == major and protobuf[1:] >= (minor, patch), (pins["protobuf"], (major, minor, patch))
    assert tuple(map(int, pins["grpcio"].split(".")[:3])) >= grpc_min
    assert all(gpu_bundle.canonical(p) in pins for p in gpu_bundle.PACKAGES)  # every carried wheel is pinned
