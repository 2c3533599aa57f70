"""Envoy's config as files (genrpc.envoy: envoy.yaml.j2, error_shaper.lua, genrpc.pb): the committed rendering is
current and the real Envoy accepts it, the error table is what the config carries, the public bridge routes need
no API key, and a non-editable install ships the template, the Lua and the descriptor."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from _procs import HOST, free_port, run_envoy
from genrpc.envoy import config as envoy_config
from genrpc.error_table import DASHSCOPE_HTTP_CODES, GRPC_ERROR_MAP, HTTP_ERROR_CODES, HTTP_ERROR_TYPES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import render_envoy  # noqa: E402


def _validate(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([envoy_config.envoy_binary(), "--mode", "validate", "-c", str(config), "-l", "error"],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rendering_is_the_same_in_every_process():
    """Nothing in the rendering may follow Python's per-process hash seed (a protobuf map serialised in hash order
    made the committed file look stale in one run of three)."""
    import os

    for seed in ("10", "11", "12", "14"):  # with map order by hash, 10, 12 and 14 gave another file than 11
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_envoy.py"), "--check"], cwd=ROOT,
                              env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (seed, done.stdout, done.stderr)


def test_committed_rendering_is_current_and_valid():
    assert render_envoy.LOCAL_CONFIG.read_text() == render_envoy.local_config(), \
        "stale envoy/rendered/genrpc-local.yaml: run `python scripts/render_envoy.py`"
    result = _validate(render_envoy.LOCAL_CONFIG, ROOT)  # its descriptor path is relative to the repository root
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_option_renders_a_config_envoy_accepts(tmp_path):
    text = envoy_config.render(listen_host="0.0.0.0", listen_port=8080, admin_port=9901, grpc_host="genrpc-service",
                               grpc_port=50051, bridge_host="genrpc-bridge", bridge_port=8001,
                               descriptor_path=envoy_config.descriptor_path(), api_keys={'sk-"q"\\': "team-a"},
                               cors_allowed_origins=["https://app.example.com"], rate_limit_rps=5,
                               max_request_bytes=1024, unary_timeout_s=3, stream_idle_timeout_s=4,
                               client_limits={"team-a": envoy_config.ClientLimits(rps=7, tpm=100)},
                               tls=envoy_config.TlsFiles(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"),
                                                         str(tmp_path / "cert.pem")),
                               request_headers_timeout_s=5, request_timeout_s=6, idle_timeout_s=7)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                    "cert.pem", "-days", "1", "-subj", "/CN=localhost"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)  # Envoy's validation reads the certificate files
    config = tmp_path / "envoy.yaml"
    config.write_text(text)
    result = _validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    hcm = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    auth = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.api_key_auth")
    assert auth["typed_config"]["credentials"] == [{"key": 'sk-"q"\\', "client": "team-a"}]  # quoted, not broken
    limit = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.local_ratelimit")["typed_config"]
    assert limit["descriptors"] == [{"entries": [{"key": "client", "value": "team-a"}],
                                     "token_bucket": {"max_tokens": 7, "tokens_per_fill": 7, "fill_interval": "1s"}}]
    assert (hcm["request_headers_timeout"], hcm["request_timeout"]) == ("5s", "6s")
    tls = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    assert tls["typed_config"]["require_client_certificate"] is True


def test_a_missing_template_parameter_is_an_error():
    """StrictUndefined: a parameter the template uses but render() does not pass fails instead of rendering ''."""
    import jinja2

    template = envoy_config._environment().get_template(envoy_config.TEMPLATE)
    with pytest.raises(jinja2.UndefinedError):
        template.render(admin_host="127.0.0.1")


def test_the_error_table_is_what_envoy_carries():
    """Envoy's own replies (local_reply_config) and the Lua shaper's tables are generated from genrpc/error_table.py."""
    text = envoy_config.render(listen_host=HOST, listen_port=1, admin_port=2, grpc_host=HOST, grpc_port=3,
                               bridge_host=HOST, bridge_port=4, descriptor_path="genrpc.pb")
    hcm = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    lua = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua")
    source = lua["typed_config"]["default_source_code"]["inline_string"]
    rows = re.findall(r"\[(\d+)\] = \{(\d+), '(\"\w+\")', '(\"\w+\"|null)'\}", source)
    assert {int(c): (int(s), json.loads(t), json.loads(o)) for c, s, t, o in rows} == GRPC_ERROR_MAP
    http_rows = re.findall(r"\[(\d+)\] = '(\"\w+\")',", source)
    assert {int(s): json.loads(t) for s, t in http_rows} == HTTP_ERROR_TYPES
    assert (ROOT / "envoy" / "error_shaper.lua").read_text().strip() in source

    def status_of(mapper):
        [cmp] = [f["status_code_filter"]["comparison"] for f in mapper["filter"]["and_filter"]["filters"]
                 if "status_code_filter" in f]
        return cmp["op"], cmp["value"]["default_value"]

    dashscope, openai_shaped = {}, {}
    for mapper in hcm["local_reply_config"]["mappers"]:
        filters = mapper["filter"].get("and_filter", {}).get("filters", [])
        if not any("status_code_filter" in f for f in filters):
            continue  # the gateway's admission mappers (response flag UO): tests/test_overload.py
        body = mapper["body_format_override"]["json_format"]
        if len(mapper["filter"]["and_filter"]["filters"]) == 3 and "error" not in body:
            op, status = status_of(mapper)
            if op == "EQ":
                dashscope[status] = body["code"]
        elif len(mapper["filter"]["and_filter"]["filters"]) == 2:
            op, status = status_of(mapper)
            if op == "EQ":
                openai_shaped[status] = (body["error"]["type"], body["error"]["code"])
    assert dashscope == DASHSCOPE_HTTP_CODES
    assert {s: c for s, (_, c) in openai_shaped.items() if c} == HTTP_ERROR_CODES
    assert {s: t for s, (t, _) in openai_shaped.items() if s in HTTP_ERROR_TYPES} == HTTP_ERROR_TYPES


class _StandInBridge(BaseHTTPRequestHandler):
    """Records each request; answers 200 JSON, except /health/ready: 503 with a JSON body that is not an error in
    OpenAI's shape (the Lua shaper must pass it through untouched), and the DashScope prefix: a plain-text 405
    (the Lua shaper turns it into an OpenAI error)."""
    seen: list[tuple[str, str, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.seen.append(("GET", self.path, self.headers.get("x-client-id")))
        status, body, content_type = 200, b'{"ok":1}', "application/json"
        if self.path == "/health/ready":
            status, body = 503, b'{"status":"not_serving"}'
        elif self.path.startswith("/api/v1/services/aigc/"):
            status, body, content_type = 405, 'Method "GET" \\ not allowed: naïve\n'.encode(), "text/plain"
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_bridge():
    _StandInBridge.seen = []
    server = ThreadingHTTPServer((HOST, 0), _StandInBridge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_public_bridge_routes_need_no_api_key(tmp_path, stand_in_bridge):
    """With API keys on: GET /health, /health/ready, /playground and / reach the bridge without a key, untranscoded
    (bodies and statuses as the bridge sent them); everything else still needs one."""
    with run_envoy(tmp_path, grpc_port=free_port(), bridge_port=stand_in_bridge.server_address[1],
                   name="envoy-public", api_keys={"sk-public": "team-a"}) as handle:
        with httpx.Client(base_url=handle.base_url, timeout=30) as http:
            for path in envoy_config.PUBLIC_BRIDGE_ROUTES.values():
                resp = http.get(path)
                if path == "/health/ready":
                    assert resp.status_code == 503 and resp.json() == {"status": "not_serving"}, resp.text
                else:
                    assert resp.status_code == 200 and resp.json() == {"ok": 1}, resp.text
                assert _StandInBridge.seen[-1] == ("GET", path, None)
            seen = len(_StandInBridge.seen)
            for method, path in (("GET", "/health/other"), ("GET", "/playground/x"), ("POST", "/health"),
                                 ("GET", "/v1/models"), ("POST", "/")):
                resp = http.request(method, path)
                assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", (path, resp.text)
            assert len(_StandInBridge.seen) == seen  # refused by Envoy
            resp = http.get("/health", headers={"authorization": "Bearer sk-public"})
            assert resp.status_code == 200 and _StandInBridge.seen[-1] == ("GET", "/health", None)
            resp = http.get("/api/v1/services/aigc/x", headers={"authorization": "Bearer sk-public"})
            assert resp.status_code == 405 and resp.headers["content-type"] == "application/json", resp.text
            assert resp.json() == {"error": {"message": 'Method "GET" \\ not allowed: naïve', "param": None,
                                             "type": "invalid_request_error", "code": None}}
            assert _StandInBridge.seen[-1] == ("GET", "/api/v1/services/aigc/x", "team-a")


def test_a_non_editable_install_ships_template_lua_and_descriptor(tmp_path):
    """`pip install .` (not -e): genrpc.envoy finds its files with importlib.resources, wherever it is installed.
    The wheel is built from a copy of the sources, so the test never writes into the checkout."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "rendered")
    for name in ("genrpc", "service", "bridge", "envoy"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, timeout=120, capture_output=True)
    assert not (target / "envoy").exists() and not (target / "service").exists()  # nothing generic at the top
    probe = ("import json, genrpc.envoy.config as c, genrpc.cli as cli\n"
             "from genrpc.settings import Settings\n"
             "print(json.dumps({'module': c.__file__, 'descriptor': str(c.descriptor_path()),"
             " 'yaml': cli.envoy_yaml(Settings.model_construct())}))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert Path(found["module"]).is_relative_to(target) and Path(found["descriptor"]).is_relative_to(target)
    assert Path(found["descriptor"]).read_bytes() == (ROOT / "envoy" / "genrpc.pb").read_bytes()
    config = tmp_path / "envoy.yaml"
    config.write_text(found["yaml"])
    assert f'proto_descriptor: "{found["descriptor"]}"' in found["yaml"]
    result = _validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
