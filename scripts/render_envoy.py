"""Writes the committed files derived from envoy/ (never edit them by hand):

- envoy/rendered/genrpc-local.yaml  <- envoy/envoy.yaml.j2 rendered for the default settings, as `genrpc up` renders
  it (through genrpc.cli.envoy_yaml), so the config that runs can be read without running code. Its descriptor
  path is relative (envoy/genrpc.pb): from the repository root, `envoy -c envoy/rendered/genrpc-local.yaml` runs it.
- k8s/base/envoy/genrpc.pb          <- envoy/genrpc.pb (generated from protos/ by scripts/gen_protos.py): kustomize's
  configMapGenerator cannot read files outside the kustomization's directory, hence the copy.

Envoy's config is not committed for Kubernetes: the Envoy pod's init container renders it at start with
`genrpc envoy-config` and the API keys from the `genrpc-api-keys` Secret; the in-cluster addresses below are what
its arguments must say (tests/test_k8s.py runs those arguments and checks the result).
Run `python scripts/render_envoy.py` (`make protos` does) after changing envoy/, protos/, genrpc/error_table.py or
the settings' defaults; `--check` exits 1 when a committed file is stale (tests/test_envoy_template.py and
tests/test_k8s.py assert the same).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from genrpc.settings import Settings  # noqa: E402

LOCAL_CONFIG = ROOT / "envoy" / "rendered" / "genrpc-local.yaml"
LOCAL_DESCRIPTOR = "envoy/genrpc.pb"  # relative to the repository root
K8S_ENVOY_DIR = ROOT / "k8s" / "base" / "envoy"
DESCRIPTOR_SOURCE = ROOT / "envoy" / "genrpc.pb"

# In-cluster addresses: the Service names in k8s/base, the mount path of the descriptor ConfigMap in the Envoy
# container, and the keys file of the mounted Secret in the init container.
SERVICE_PODS_HOST = "genrpc-service-pods"  # headless: Envoy's and the bridge's upstreams are the pods themselves
BRIDGE_HOST = "genrpc-bridge"
DESCRIPTOR_MOUNT = "/etc/envoy/descriptor/genrpc.pb"
API_KEYS_FILE = "/etc/genrpc/api-keys/keys"


def ports() -> dict[str, int]:
    """The ports every manifest uses: genrpc's own defaults (Settings), so there is one source."""
    s = Settings()
    return {"grpc": s.grpc_port, "bridge": s.bridge_port, "envoy": s.envoy_port, "envoy_admin": s.envoy_admin_port,
            "metrics": s.metrics_port}


def local_config() -> str:
    from genrpc.cli import envoy_yaml

    # model_construct: the fields' defaults only, never GENRPC_* variables of the environment that runs this
    return envoy_yaml(Settings.model_construct(), descriptor=LOCAL_DESCRIPTOR)


def rendered() -> dict[pathlib.Path, bytes]:
    return {LOCAL_CONFIG: local_config().encode(), K8S_ENVOY_DIR / "genrpc.pb": DESCRIPTOR_SOURCE.read_bytes()}


def stale() -> list[pathlib.Path]:
    return [path for path, data in rendered().items() if not path.exists() or path.read_bytes() != data]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    args = parser.parse_args()
    if args.check:
        bad = stale()
        for path in bad:
            print(f"stale: {path.relative_to(ROOT)} (run python scripts/render_envoy.py)", file=sys.stderr)
        return 1 if bad else 0
    for path, data in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
