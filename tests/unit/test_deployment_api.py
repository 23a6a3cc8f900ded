"""docker/: the control's HTTP API is the one thing callers reach, checked without a
container engine or a cluster.

compose publishes the API's port from the control service only (Flower's loopback port
aside), over TLS from secret files, on a network of its own; Kubernetes has a Service
for it, HTTPS probes and a NetworkPolicy that admits labelled callers to that port and
to nothing else. The health check's HTTPS request runs against a real TLS server on
loopback.
"""

from __future__ import annotations

import datetime
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_deployment import (
    COMPOSE,
    DOCKER,
    SERVICES,
    WORKLOADS,
    environment_of,
    instructions,
    interpolate,
    load_module,
    matches,
    networks_of,
    of_kind,
    secrets_of,
)

API_PORT = 8765
CERT, KEY = "/run/secrets/api/tls.crt", "/run/secrets/api/tls.key"
NAMESPACE = "toolplane"
CALLER_LABEL = "toolplane.io/api-client"


# -- compose ------------------------------------------------------------------------------


def published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each published port, with compose's
    defaults for the variables."""
    found = []
    for entry in service.get("ports", []):
        assert isinstance(entry, str), f"{entry}: the short syntax, host address first"
        host, port, target = interpolate(entry, {}).rsplit(":", 2)
        found.append((host, port, target))
    return found


# what starts without a profile (docker/observability adds prometheus and grafana)
DEFAULT = {name: s for name, s in SERVICES.items() if not s.get("profiles")}


def test_the_control_serves_the_api_on_every_address_of_its_container_over_tls():
    control = SERVICES["control"]
    env = environment_of(control)
    assert env["TOOLPLANE_API_BIND"] == f"0.0.0.0:{API_PORT}"
    secrets = secrets_of(control)
    assert (env["TOOLPLANE_API_CERT"], env["TOOLPLANE_API_KEY"]) == (CERT, KEY)
    assert (secrets["api_tls_cert"], secrets["api_tls_key"]) == (CERT, KEY)
    for source in ("api_tls_cert", "api_tls_key"):
        assert set(COMPOSE["secrets"][source]) == {"file"}, source
        holders = {name for name, s in SERVICES.items() if source in secrets_of(s)}
        # Prometheus (profile observability) checks the API's certificate; only the
        # control holds the key
        assert holders == {"control"} | ({"prometheus"} if source == "api_tls_cert" else set())
    # Not under /run/secrets/env, which the entrypoint reads as one-line variables.
    assert not any(path.startswith("/run/secrets/env/") for path in (CERT, KEY))
    assert "TOOLPLANE_API_CLIENT_CA" not in env, "optional: docker/compose.mtls.yaml"


def test_only_the_control_publishes_a_port_besides_flower_on_loopback():
    ports = {name: published(s) for name, s in DEFAULT.items() if s.get("ports")}
    assert set(ports) == {"control", "flower"}, sorted(ports)  # optional ones: loopback too
    assert ports["control"] == [("127.0.0.1", str(API_PORT), str(API_PORT))]
    assert ports["flower"] == [("127.0.0.1", "5555", "5555")]
    (entry,) = SERVICES["control"]["ports"]
    assert entry.startswith("${TOOLPLANE_API_HOST_IP:-127.0.0.1}:"), "the host address is set"
    for name, s in SERVICES.items():
        assert not s.get("expose") and s.get("network_mode") in (None, "none"), name


def test_the_api_network_holds_the_control_alone_and_the_rest_stays_internal():
    networks = COMPOSE["networks"]
    on_api = {name for name, s in SERVICES.items() if "api" in networks_of(s)}
    assert on_api == {"control", "prometheus"}  # prometheus: profile observability, scrapes
    assert networks["api"].get("internal") is not True, "an internal network publishes no port"
    assert networks["api"]["name"] == "toolplane-api", "callers' projects join it by name"
    published_from = {"api", "operator"}  # the control's API, Flower
    for name in ("postgres", "redis", "migrate", *(n for n in SERVICES if n.startswith("worker-"))):
        for network in networks_of(SERVICES[name]):
            assert networks[network].get("internal") is True, (name, network)
            assert network not in published_from, (name, network)
    for network in ("sandbox", "backplane", "db"):
        assert networks[network].get("internal") is True, network


def healthcheck_module():
    return load_module("healthcheck")


def test_the_control_health_check_pings_its_consumer_and_asks_readyz_over_https():
    """compose keeps the image's health check, which now also asks the API."""
    control = SERVICES["control"]
    assert "healthcheck" not in control, "the image's HEALTHCHECK (docker/healthcheck.py)"
    final = instructions("Dockerfile.control")
    healthcheck = next(rest for keyword, rest in final if keyword == "HEALTHCHECK")
    assert json.loads(healthcheck.split("CMD", 1)[1])[-1] == "/app/healthcheck.py"
    module = healthcheck_module()
    argv = ["/opt/venv/bin/python", "/opt/venv/bin/toolplane", *control["command"]]
    check = module.check_for(argv, "c0ffee", environment_of(control))
    assert check == module.Check(node="control@c0ffee", url=f"https://127.0.0.1:{API_PORT}/readyz")
    assert control["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
    }


def test_the_mtls_override_requires_client_certificates_from_a_ca_file():
    override = yaml.safe_load((DOCKER / "compose.mtls.yaml").read_text())
    assert set(override["services"]) == {"control"}
    control = override["services"]["control"]
    target = environment_of(control)["TOOLPLANE_API_CLIENT_CA"]
    assert secrets_of(control) == {"api_client_ca": target}
    assert override["secrets"] == {"api_client_ca": {"file": "./secrets/api/client-ca.crt"}}
    assert not target.startswith("/run/secrets/env/")
    merged = {**environment_of(SERVICES["control"]), **environment_of(control)}
    module = healthcheck_module()
    argv = ["/opt/venv/bin/toolplane", *SERVICES["control"]["command"]]
    # No client certificate for a request: the port is connected to, the database asked.
    assert module.check_for(argv, "h", merged) == module.Check(
        node="control@h", port=("127.0.0.1", API_PORT), database=True
    )


def test_the_health_check_finds_the_api_from_its_settings():
    module = healthcheck_module()
    check_for, Check = module.check_for, module.Check
    api = ["/opt/venv/bin/toolplane", "api"]
    tls = {"TOOLPLANE_API_CERT": CERT, "TOOLPLANE_API_KEY": KEY}
    assert check_for(api, "h", {}).url == f"http://127.0.0.1:{API_PORT}/readyz"
    assert check_for(api, "h", tls).url == f"https://127.0.0.1:{API_PORT}/readyz"
    assert check_for(api, "h", tls, live=True).url == f"https://127.0.0.1:{API_PORT}/livez"
    bound = {"TOOLPLANE_API_BIND": "10.1.2.3:9443"}
    assert check_for(api, "h", bound).url == "http://10.1.2.3:9443/readyz"
    assert check_for(api, "h", {"TOOLPLANE_API_BIND": "[::]:8765"}).url == (
        "http://[::1]:8765/readyz"
    )
    control = ["/opt/venv/bin/toolplane", "control"]
    # Alive: the consumer and the API serve; a database outage must not restart it.
    assert check_for(control, "h", tls, live=True) == Check(
        node="control@h", url=f"https://127.0.0.1:{API_PORT}/livez"
    )
    assert check_for([*control, "--no-api"], "h", tls, live=True) == Check(node="control@h")
    with pytest.raises(ValueError, match=r"TOOLPLANE_API_BIND: '8765' is not host:port"):
        check_for(api, "h", {"TOOLPLANE_API_BIND": "8765"})


# -- the health check's HTTPS request, against a real TLS server on loopback --------------


def certificate_files(directory: Path) -> tuple[Path, Path]:
    """A CA and a server certificate for `control` (not for 127.0.0.1), as the deployment
    guide makes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "toolplane API CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "control")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("control")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(
        server.public_bytes(serialization.Encoding.PEM)
        + ca.public_bytes(serialization.Encoding.PEM)
    )
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/readyz":
            status, body = 200, {"status": "ready"}
        else:
            status, body = 503, {"code": "unavailable", "detail": "database: connection refused"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[int]:
    cert_file, key_file = certificate_files(tmp_path)
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_health_check_gets_readyz_over_https_and_reports_a_503_in_one_line(https_server):
    """The certificate names `control`, not 127.0.0.1, and is not verified: the check asks
    its own process whether it serves."""
    module = healthcheck_module()
    module._get(f"https://127.0.0.1:{https_server}/readyz")
    with pytest.raises(RuntimeError, match=r"HTTP 503 database: connection refused$"):
        module._get(f"https://127.0.0.1:{https_server}/other")
    module._connect(("127.0.0.1", https_server))


# -- Kubernetes ---------------------------------------------------------------------------


def control_pod() -> dict[str, Any]:
    return of_kind("Deployment")["control"]["spec"]["template"]["spec"]


def control_container() -> dict[str, Any]:
    (container,) = control_pod()["containers"]
    return container


def test_the_control_api_service_reaches_the_control_pods_api_port_only():
    service = of_kind("Service")["control-api"]["spec"]
    assert service["type"] == "ClusterIP", "callers come through the cluster network"
    (port,) = service["ports"]
    assert (port["port"], port["protocol"]) == (API_PORT, "TCP")
    container = control_container()
    (named,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert named["containerPort"] == API_PORT
    env = {v["name"]: v["value"] for v in container["env"]}
    assert env["TOOLPLANE_API_BIND"] == f"0.0.0.0:{API_PORT}"
    selected = {
        name
        for name, w in WORKLOADS.items()
        if matches(
            {"matchLabels": service["selector"]}, w["spec"]["template"]["metadata"]["labels"]
        )
    }
    assert selected == {"control"}
    for name, s in of_kind("Service").items():
        assert s["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name}: no node or LB port"
    assert not of_kind("Ingress"), "callers reach the Service; an ingress is the operator's"


def test_the_control_pod_serves_tls_from_the_secret_and_probes_over_https():
    pod, container = control_pod(), control_container()
    env = {v["name"]: v["value"] for v in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    tls = volumes["api-tls"]["secret"]
    assert tls["secretName"] == "toolplane-api-tls" and tls["defaultMode"] == 0o440
    directory = mounts["api-tls"]["mountPath"]
    assert mounts["api-tls"]["readOnly"] is True and directory != "/run/secrets/env"
    files = {f"{directory}/{item['path']}": item["key"] for item in tls["items"]}
    assert files == {CERT: "tls.crt", KEY: "tls.key"}, "a kubernetes.io/tls Secret's keys"
    assert (env["TOOLPLANE_API_CERT"], env["TOOLPLANE_API_KEY"]) == (CERT, KEY)
    ready = container["readinessProbe"]["httpGet"]
    assert ready == {"path": "/readyz", "port": "api", "scheme": "HTTPS"}
    live = container["livenessProbe"]["exec"]["command"]
    assert live == ["/opt/venv/bin/python", "-I", "/app/healthcheck.py", "--live"]
    module = healthcheck_module()
    argv = ["/opt/venv/bin/toolplane", *container["args"]]
    assert module.check_for(argv, "pod", env, live=True) == module.Check(
        node="control@pod", url=f"https://127.0.0.1:{API_PORT}/livez"
    )


def admits(peer: dict[str, Any], pod: dict[str, str], namespace: dict[str, str]) -> bool:
    """Whether a NetworkPolicy peer of the toolplane namespace matches ``pod`` (its labels)
    in a namespace with the labels ``namespace``."""
    assert "ipBlock" not in peer, "peers by label only"
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], namespace):
            return False
    elif namespace.get("kubernetes.io/metadata.name") != NAMESPACE:
        return False  # a podSelector alone: pods of the policy's own namespace
    return matches(peer.get("podSelector", {}), pod)


def reachable(pod: dict[str, str], namespace: dict[str, str]) -> set[tuple[str, int | None]]:
    """(component, port) of every toolplane pod whose ingress policies admit ``pod``
    (None: every port)."""
    found = set()
    for workload in WORKLOADS.values():
        target = workload["spec"]["template"]["metadata"]["labels"]
        for policy in of_kind("NetworkPolicy").values():
            spec = policy["spec"]
            if "Ingress" not in spec["policyTypes"] or not matches(spec["podSelector"], target):
                continue
            for rule in spec.get("ingress", []):
                if any(admits(peer, pod, namespace) for peer in rule.get("from", [{}])):
                    ports = [p["port"] for p in rule.get("ports") or [{"port": None}]]
                    found |= {(target["app.kubernetes.io/component"], port) for port in ports}
    return found


CALLER_NAMESPACE = {"kubernetes.io/metadata.name": "agents", CALLER_LABEL: "true"}


def test_callers_reach_the_api_port_of_the_control_and_nothing_else():
    assert of_kind("NetworkPolicy")["default-deny"]["spec"]["podSelector"] == {}
    caller = {"app": "agent", CALLER_LABEL: "true"}
    assert reachable(caller, CALLER_NAMESPACE) == {("control", API_PORT)}
    # Both labels are needed: the namespace's (a cluster admin's) and the pod's.
    assert reachable({"app": "agent"}, CALLER_NAMESPACE) == set()
    assert reachable(caller, {"kubernetes.io/metadata.name": "elsewhere"}) == set()


def test_no_pod_of_toolplane_is_a_caller_and_workers_never_reach_the_api():
    namespace = of_kind("Namespace")[NAMESPACE]["metadata"]["labels"]
    assert CALLER_LABEL not in namespace
    toolplane = {**namespace, "kubernetes.io/metadata.name": NAMESPACE}
    for workload in WORKLOADS.values():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert CALLER_LABEL not in labels
        admitted_to_api = ("control", API_PORT) in reachable(labels, toolplane)
        assert not admitted_to_api, labels
    # The workers' egress: Redis and DNS only, so not the control either way.
    control = of_kind("Deployment")["control"]["spec"]["template"]["metadata"]["labels"]
    for policy in of_kind("NetworkPolicy").values():
        spec = policy["spec"]
        worker = {"app.kubernetes.io/component": "worker"}
        if "Egress" in spec["policyTypes"] and matches(spec["podSelector"], worker):
            for rule in spec.get("egress", []):
                for peer in rule["to"]:
                    assert "podSelector" in peer and not matches(peer["podSelector"], control)
