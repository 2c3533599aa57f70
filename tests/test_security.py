"""Security and slow clients against the real stack (`genrpc up` with the synthetic engine, unpaced, so the
stack starts in seconds and a stream outruns any reader; Envoy, bridge and service are the real processes): API
keys on every path, per-client rate limits (requests per second in Envoy, tokens per minute in the service), TLS
and mTLS on Envoy's listener with a throwaway CA made here (openssl CLI), and slow or stalled clients (slowloris
headers and bodies, an SSE reader that stops reading)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from _procs import run_envoy
from _stack_up import StackUp
from genrpc.envoy import config as envoy_config
from genrpc.settings import DEFAULT_MODEL_ID
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc, model_pb2

KEYS = """# test keys
sk-good team-a
sk-rps team-rps rps=2
sk-tpm team-tpm tpm=150  # tokens per minute, charged by the service
"""
CHAT = "/v1/chat/completions"
DASHSCOPE = "/api/v1/services/aigc/text-generation/generation"
HEADERS_TIMEOUT_S = 2
REQUEST_TIMEOUT_S = 3
SEND_TIMEOUT_S = 2


def chat_body(stream: bool = False, max_tokens: int = 4) -> dict:
    return {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secured")
    keys = workdir / "keys"
    keys.write_text(KEYS)
    stack = StackUp(workdir, os.getpid() % 10000 + 500, engine="synthetic", synthetic_tokens_per_s=0,
                    api_keys_file=keys, request_headers_timeout_s=HEADERS_TIMEOUT_S,
                    request_timeout_s=REQUEST_TIMEOUT_S, bridge_send_timeout_s=SEND_TIMEOUT_S,
                    send_timeout_s=SEND_TIMEOUT_S, max_tokens_limit=0)  # no ceiling: the stalled-reader test needs a stream that outlasts buffers
    try:
        yield stack
    finally:
        stack.stop()


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# ---- API keys on every path ----------------------------------------------------------------------------

BAD_AUTH = [{}, {"authorization": "Bearer sk-wrong"}, {"authorization": "sk-good"},  # bare key: no Bearer
            {"authorization": "Basic sk-good"}, {"authorization": "bearer sk-good"}, {"x-api-key": "sk-good"},
            {"authorization": "Bearer  sk-good"}, {"authorization": "Bearer team-a"}]


def rest_calls(auth: dict) -> list[tuple[str, str, dict | None, dict]]:
    """(method, path, json body, headers) for every REST path: transcoded unary, SSE, DashScope both ways."""
    return [("POST", CHAT, chat_body(), auth), ("POST", CHAT, chat_body(stream=True), auth),
            ("POST", "/v1/completions", {"model": DEFAULT_MODEL_ID, "prompt": "hi", "max_tokens": 2}, auth),
            ("POST", "/v1/completions", {"model": DEFAULT_MODEL_ID, "prompt": "hi", "max_tokens": 2,
                                         "stream": True}, auth),
            ("GET", "/v1/models", None, auth), ("GET", f"/v1/models/{DEFAULT_MODEL_ID}", None, auth),
            ("POST", DASHSCOPE, {"model": DEFAULT_MODEL_ID, "input": {"prompt": "hi"},
                                 "parameters": {"max_tokens": 2}}, auth),
            ("POST", DASHSCOPE, {"model": DEFAULT_MODEL_ID, "input": {"prompt": "hi"},
                                 "parameters": {"max_tokens": 2}}, {**auth, "x-dashscope-sse": "enable"})]


def grpc_chat_request(max_tokens: int = 2) -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(model=DEFAULT_MODEL_ID, max_tokens=max_tokens, messages=[
        chat_pb2.ChatMessage(role="user", content={"string_value": "hi"})])


def reflection_call(address: str, metadata: tuple, credentials: grpc.ChannelCredentials | None = None):
    """Outcome of server reflection's bidi ServerReflectionInfo (list the services) through Envoy.

    With grpcio's sync API: Envoy refuses a call without a valid key on its headers (trailers-only, HTTP 200,
    content-type application/grpc, grpc-status 16, then RST_STREAM(NO_ERROR)), which can reach the client while
    it is still sending its first message. grpcio's asyncio API then reports that call as INTERNAL ("Internal
    error from Core", a failed SendMessageOperation) instead of the status it received (grpc/grpc#36066, fix
    proposed in grpc/grpc#43486); the sync API, like other gRPC implementations, reports UNAUTHENTICATED."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            replies = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10))
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.UNAUTHENTICATED or e.details(), "UNAUTHENTICATED without a message"
            return e.code()
    names = {s.name for s in replies[0].list_services_response.service}
    assert "genrpc.v1.GenerationService" in names, names
    return grpc.StatusCode.OK


async def grpc_calls(address: str, metadata: tuple, credentials: grpc.ChannelCredentials | None = None) -> list:
    """Outcome (a grpc.StatusCode) of every native gRPC path through Envoy: unary, stream, reflection."""
    channel = (grpc.aio.secure_channel(address, credentials) if credentials
               else grpc.aio.insecure_channel(address))
    outcomes = []
    async with channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        request = grpc_chat_request()
        for call in (lambda: stub.ListModels(model_pb2.ListModelsRequest(), metadata=metadata, timeout=10),
                     lambda: stub.CreateChatCompletion(request, metadata=metadata, timeout=10)):
            try:
                await call()
                outcomes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as e:
                outcomes.append(e.code())
        try:
            async for _ in stub.Chat(request, metadata=metadata, timeout=10):
                pass
            outcomes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as e:
            outcomes.append(e.code())
    outcomes.append(await asyncio.to_thread(reflection_call, address, metadata, credentials))
    return outcomes


async def test_every_path_needs_a_bearer_key_and_refusals_never_reach_the_service(secured):
    before = secured.requests_total()
    async with httpx.AsyncClient(base_url=f"http://{secured.envoy}", timeout=30) as http:
        for auth in BAD_AUTH:
            for method, path, body, headers in rest_calls(auth):
                resp = await http.request(method, path, json=body, headers=headers)
                assert resp.status_code == 401, (auth, method, path, resp.status_code, resp.text)
                if path.startswith("/api/"):
                    assert resp.json()["code"] == "InvalidApiKey", resp.text
                else:
                    assert assert_openai_error(resp, 401)["code"] == "invalid_api_key"
                assert not any(h.startswith("grpc-") for h in resp.headers)
        bare = await http.post(CHAT, json=chat_body(), headers={"authorization": "sk-good"})
        assert "Bearer" in bare.json()["error"]["message"]
    for auth in BAD_AUTH:
        metadata = tuple(auth.items())
        assert await grpc_calls(secured.envoy, metadata) == [grpc.StatusCode.UNAUTHENTICATED] * 4, auth
    assert secured.requests_total() == before  # not one refused request reached the service

    # the right key works on every path (and is counted by the service)
    async with httpx.AsyncClient(base_url=f"http://{secured.envoy}", timeout=30) as http:
        for method, path, body, headers in rest_calls({"authorization": "Bearer sk-good"}):
            resp = await http.request(method, path, json=body, headers=headers)
            assert resp.status_code == 200, (method, path, resp.text)
    assert await grpc_calls(secured.envoy, (("authorization", "Bearer sk-good"),)) == [grpc.StatusCode.OK] * 4
    assert secured.requests_total() >= before + 8 + 3


async def test_public_routes_stay_public(secured):
    async with httpx.AsyncClient(base_url=f"http://{secured.envoy}", timeout=30, follow_redirects=True) as http:
        for path in ("/health", "/health/ready", "/playground", "/"):
            resp = await http.get(path)
            assert resp.status_code == 200, (path, resp.text)
        assert (await http.post("/health")).status_code == 401  # only GET is public


# ---- per-client rate limits ----------------------------------------------------------------------------

async def test_requests_per_second_per_client(secured):
    """team-rps has rps=2: a burst of 8 gets at most 4 through (one refill may land inside the burst) and 429s
    naming its limit; team-a (no limit of its own, no global limit) is not limited by the same burst."""
    async with httpx.AsyncClient(base_url=f"http://{secured.envoy}", timeout=30) as http:
        limited, free = await asyncio.gather(
            asyncio.gather(*[http.post(CHAT, json=chat_body(stream=i % 2 == 1),
                                       headers={"authorization": "Bearer sk-rps"}) for i in range(8)]),
            asyncio.gather(*[http.post(CHAT, json=chat_body(), headers={"authorization": "Bearer sk-good"})
                             for _ in range(8)]))
        codes = sorted(r.status_code for r in limited)
        assert codes.count(429) >= 4 and set(codes) <= {200, 429}, codes
        assert [r.status_code for r in free] == [200] * 8
        for resp in limited:
            if resp.status_code == 429:
                error = assert_openai_error(resp, 429)
                assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
                assert "client team-rps: 2 requests per second" in error["message"], error
                assert resp.headers["retry-after"] == "1"
    async with openai.AsyncOpenAI(base_url=f"http://{secured.envoy}/v1", api_key="sk-rps", max_retries=0) as sdk:
        results = await asyncio.gather(*[sdk.models.list() for _ in range(6)], return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and all(isinstance(e, openai.RateLimitError) for e in errors), results
    errors = await asyncio.gather(*[grpc_calls(secured.envoy, (("authorization", "Bearer sk-rps"),))
                                    for _ in range(3)])
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in sum(errors, [])


async def test_tokens_per_minute_per_client(secured):
    """team-tpm has tpm=150 (the service charges prompt + completion tokens when a request ends): within a few
    requests of 40 completion tokens it is refused with 429 / RESOURCE_EXHAUSTED naming the limit, before any
    work; another client is unaffected."""
    async with httpx.AsyncClient(base_url=f"http://{secured.envoy}", timeout=30) as http:
        statuses = []
        for _ in range(8):
            resp = await http.post(CHAT, json=chat_body(max_tokens=40), headers={"authorization": "Bearer sk-tpm"})
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                break
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        error = assert_openai_error(resp, 429)
        assert error["type"] == "rate_limit_error", error
        assert "client team-tpm: 150 tokens per minute" in error["message"], error
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        stream = await http.post(CHAT, json=chat_body(stream=True), headers={"authorization": "Bearer sk-tpm"})
        assert "150 tokens per minute" in assert_openai_error(stream, 429)["message"]
        assert 1 <= int(stream.headers["retry-after"]) <= 60  # from the bridge
        resp = await http.post(CHAT, json=chat_body(max_tokens=40), headers={"authorization": "Bearer sk-good"})
        assert resp.status_code == 200
    async with grpc.aio.insecure_channel(secured.envoy) as channel:
        request = grpc_chat_request()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await generation_service_pb2_grpc.GenerationServiceStub(channel).CreateChatCompletion(
                request, metadata=(("authorization", "Bearer sk-tpm"),), timeout=10)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per minute" in exc.value.details()


# ---- TLS and mTLS ---------------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(workdir: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=genrpc test CA", cwd=workdir)
    (workdir / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                        "extendedKeyUsage=serverAuth\n")
    (workdir / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                 f"/CN=genrpc test {name}", cwd=workdir)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=workdir)
    return {name: workdir / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("ca"))


def _envoy_in_front(secured, workdir: Path, ca: dict[str, Path], *, mtls: bool):
    return run_envoy(workdir, grpc_port=int(secured.grpc.split(":")[1]), bridge_port=int(secured.bridge.split(":")[1]),
                     name="envoy-mtls" if mtls else "envoy-tls",
                     api_keys=envoy_config.read_api_keys(secured_keys(workdir)),
                     tls=envoy_config.TlsFiles(str(ca["server.pem"]), str(ca["server.key"]),
                                               str(ca["ca.pem"]) if mtls else ""))


def secured_keys(workdir: Path) -> Path:
    path = workdir / "keys"
    path.write_text(KEYS)
    return path


async def test_tls_for_rest_and_grpc(secured, tmp_path, ca):
    """Envoy with a certificate from the throwaway CA, in front of the running service and bridge: the OpenAI
    SDK over https (unary and stream) and grpcio with ssl_channel_credentials; plain HTTP is refused."""
    with _envoy_in_front(secured, tmp_path, ca, mtls=False) as envoy:
        https = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca["ca.pem"])))
        async with openai.AsyncOpenAI(base_url=f"https://127.0.0.1:{envoy.port}/v1", api_key="sk-good",
                                      max_retries=0, http_client=https) as sdk:
            reply = await sdk.chat.completions.create(model=DEFAULT_MODEL_ID, max_tokens=3,
                                                      messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
            chunks = [c async for c in await sdk.chat.completions.create(
                model=DEFAULT_MODEL_ID, max_tokens=3, messages=[{"role": "user", "content": "hi"}], stream=True)]
            assert chunks
        creds = grpc.ssl_channel_credentials(root_certificates=ca["ca.pem"].read_bytes())
        assert await grpc_calls(f"127.0.0.1:{envoy.port}", (("authorization", "Bearer sk-good"),),
                                creds) == [grpc.StatusCode.OK] * 4
        assert await grpc_calls(f"127.0.0.1:{envoy.port}", (), creds) == [grpc.StatusCode.UNAUTHENTICATED] * 4
        async with httpx.AsyncClient(timeout=10) as plain:  # plain HTTP on the TLS port: no response
            with pytest.raises(httpx.TransportError):
                await plain.get(f"http://127.0.0.1:{envoy.port}/health")
        async with httpx.AsyncClient(timeout=10) as untrusting:  # the system CAs do not know the throwaway CA
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"https://127.0.0.1:{envoy.port}/health")


async def test_mtls_refuses_a_client_without_a_certificate(secured, tmp_path, ca):
    with _envoy_in_front(secured, tmp_path, ca, mtls=True) as envoy:
        context = ssl.create_default_context(cafile=str(ca["ca.pem"]))
        context.load_cert_chain(str(ca["client.pem"]), str(ca["client.key"]))
        async with openai.AsyncOpenAI(base_url=f"https://127.0.0.1:{envoy.port}/v1", api_key="sk-good",
                                      max_retries=0, http_client=httpx.AsyncClient(verify=context)) as sdk:
            assert (await sdk.models.list()).data
        with_cert = grpc.ssl_channel_credentials(ca["ca.pem"].read_bytes(), ca["client.key"].read_bytes(),
                                                 ca["client.pem"].read_bytes())
        assert await grpc_calls(f"127.0.0.1:{envoy.port}", (("authorization", "Bearer sk-good"),),
                                with_cert) == [grpc.StatusCode.OK] * 4

        no_cert = ssl.create_default_context(cafile=str(ca["ca.pem"]))
        async with httpx.AsyncClient(verify=no_cert, timeout=10) as http:
            with pytest.raises((httpx.TransportError, ssl.SSLError)):  # TLS 1.3: the alert comes on first read
                await http.get(f"https://127.0.0.1:{envoy.port}/health")
        async with openai.AsyncOpenAI(base_url=f"https://127.0.0.1:{envoy.port}/v1", api_key="sk-good",
                                      max_retries=0, http_client=httpx.AsyncClient(verify=no_cert)) as sdk:
            with pytest.raises(openai.APIConnectionError):
                await sdk.models.list()
        no_cert_grpc = grpc.ssl_channel_credentials(ca["ca.pem"].read_bytes())
        assert await grpc_calls(f"127.0.0.1:{envoy.port}", (("authorization", "Bearer sk-good"),),
                                no_cert_grpc) == [grpc.StatusCode.UNAVAILABLE] * 4


# ---- slow and stalled clients ---------------------------------------------------------------------------

def _closed_within(sock: socket.socket, timeout_s: float, dribble: bytes = b"") -> tuple[float, bytes]:
    """Dribbles `dribble` one byte every 0.2 s until the peer closes; returns (seconds until closed, what the
    peer sent). Fails if the connection is still open after timeout_s."""
    started = time.monotonic()
    sock.setblocking(False)
    received = b""
    position = 0
    while time.monotonic() - started < timeout_s:
        try:
            data = sock.recv(65536)
            if not data:
                return time.monotonic() - started, received
            received += data
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started, received
        if position < len(dribble):
            try:
                sock.send(dribble[position:position + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started, received
            position += 1
        time.sleep(0.2)
    raise AssertionError(f"connection still open after {timeout_s} s (received {received[:200]!r})")


def test_slowloris_headers_are_cut(secured):
    """Headers sent one byte every 0.2 s never complete: Envoy answers 408 and closes after
    request_headers_timeout_s (2 s here), not when the client is done."""
    host, port = secured.envoy.split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        elapsed, received = _closed_within(sock, HEADERS_TIMEOUT_S + 5, b"X-Slow: " + b"a" * 500)
    assert HEADERS_TIMEOUT_S - 0.5 <= elapsed, elapsed
    assert received.startswith(b"HTTP/1.1 408"), received[:200]


def test_slowloris_body_is_cut(secured):
    """A body sent one byte every 0.2 s never completes: 408 and close after request_timeout_s (3 s here); the
    service never saw the request."""
    before = secured.requests_total()
    body = json.dumps(chat_body()).encode()
    host, port = secured.envoy.split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-good\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        elapsed, received = _closed_within(sock, REQUEST_TIMEOUT_S + 5, body[:-1])
    assert REQUEST_TIMEOUT_S - 0.5 <= elapsed, elapsed
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert secured.requests_total() == before


# What a client that stopped reading can leave unread between it and the bridge before the bridge's writes block
# (README, "Slow clients"): through Envoy its 256 KiB per connection, TCP_NOTSENT_LOWAT 16 KiB toward the client,
# a 64 KiB SO_RCVBUF from the bridge, the bridge's own 16 KiB + 64 KiB; measured ~0.5 MiB.
UNREAD_BOUND_BYTES = 1024 * 1024


def _stall_sse_reader(secured, address: str, auth_header: bytes) -> tuple[float, int, bytes]:
    """A client with a tiny receive buffer that sends a streaming chat (an endless, unpaced stream), reads the
    response headers and the first bytes, then stops reading. Returns (seconds until the service's running count
    was 0 again, bytes that were still waiting for the client when it read again, the last of them)."""
    assert secured.running_and_waiting() == (0, 0)
    body = json.dumps({**chat_body(stream=True, max_tokens=1_000_000), "stream_options": {"include_usage": True}})
    host, port = address.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (auth_header, len(body), body.encode()))
        sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head or b"data: " not in head:
            head += sock.recv(1024)
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        stopped = time.monotonic()  # from here on the client reads nothing
        deadline = stopped + SEND_TIMEOUT_S + 5  # the unpaced stream fills the buffers in well under a second
        while secured.running_and_waiting() != (0, 0):
            assert time.monotonic() < deadline, f"a stalled reader still holds its slot after {SEND_TIMEOUT_S + 5} s"
            time.sleep(0.05)
        freed_after = time.monotonic() - stopped
        # reading again: what was buffered on the way, then the end of the connection without [DONE] (cut)
        unread, tail = 0, b""
        while chunk := sock.recv(65536):
            unread += len(chunk)
            tail = (tail + chunk)[-4096:]
        return freed_after, unread, tail
    finally:
        sock.close()


def test_stalled_sse_reader_frees_its_slot(secured):
    """An SSE client that stops reading a long, fast stream, directly on the bridge's port: once the bridge's send
    has been blocked for bridge_send_timeout_s (2 s here) the stream is cut and the gRPC call cancelled, so the
    service's running count returns to 0 although the client never closes its socket."""
    freed_after, unread, tail = _stall_sse_reader(secured, secured.bridge, b"X-Client-Id: team-a")
    print(f"bridge: stalled reader's slot freed {freed_after:.1f} s after it stopped reading; {unread} bytes unread")
    assert b"[DONE]" not in tail and unread <= UNREAD_BOUND_BYTES
    # freed because the bridge cut the stream (not because it finished), and said so in the log
    assert "client stopped reading" in secured.log_path.read_text(errors="replace")


async def test_stalled_sse_reader_through_envoy_is_cut_within_the_documented_bound(secured):
    """The same through Envoy, as clients reach it: Envoy holds at most 256 KiB for the client and the kernel's
    buffers on both of its sides are capped, so the bridge's writes block after ~0.5 MiB (<= 1 MiB) of unread
    stream, and its send timeout (2 s here) cuts the stream and cancels the generation; the next requests are
    served. (Envoy used to buffer up to max_request_bytes per connection, plus kernel buffers that autotune to
    megabytes: a stalled reader of a slow stream held its slot for minutes.)"""
    cut_before = secured.log_path.read_text(errors="replace").count("client stopped reading")
    freed_after, unread, tail = _stall_sse_reader(secured, secured.envoy, b"Authorization: Bearer sk-good")
    print(f"envoy: stalled reader's slot freed {freed_after:.1f} s after it stopped reading; {unread} bytes unread")
    assert freed_after <= SEND_TIMEOUT_S + 5
    assert unread <= UNREAD_BOUND_BYTES, unread
    assert b"[DONE]" not in tail and not tail.endswith(b"0\r\n\r\n"), tail[-200:]  # cut, not finished
    assert secured.log_path.read_text(errors="replace").count("client stopped reading") == cut_before + 1
    async with httpx.AsyncClient(base_url=f"http://{secured.envoy}", timeout=30,
                                 headers={"authorization": "Bearer sk-good"}) as http:
        unary = await http.post(CHAT, json=chat_body(max_tokens=8))
        assert unary.status_code == 200 and unary.json()["choices"][0]["message"]["content"], unary.text
        stream = await http.post(CHAT, json=chat_body(stream=True, max_tokens=8))
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]"), stream.text[-200:]
    assert secured.running_and_waiting() == (0, 0)


async def test_stalled_grpc_reader_through_envoy_is_cut_by_the_service(secured):
    """A native gRPC client (through Envoy) that reads one message of a long, fast stream and then stops reading:
    its HTTP/2 window fills, then Envoy's bounded window toward the service (1 MiB), so the service's writes wait;
    after send_timeout_s (2 s here) the service cuts the stream (CANCELLED) and stops the generation. The client
    then finds the stream ended with CANCELLED, not finished; the next call is served."""
    metadata = (("authorization", "Bearer sk-good"),)
    request = chat_pb2.ChatCompletionRequest(model=DEFAULT_MODEL_ID, max_completion_tokens=1_000_000, stream=True,
                                             messages=[chat_pb2.ChatMessage(role="user",
                                                                            content={"string_value": "hi"})])
    cut_before = secured.log_path.read_text(errors="replace").count("took no message")
    # no BDP probing: the client's window stays at grpc's default while the application does not read
    async with grpc.aio.insecure_channel(secured.envoy, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        call = stub.Chat(request, metadata=metadata)
        assert (await call.read()).choices
        stopped = time.monotonic()
        deadline = stopped + SEND_TIMEOUT_S + 10
        while secured.running_and_waiting() != (0, 0):
            assert time.monotonic() < deadline, "the stalled stream still holds its slot"
            await asyncio.sleep(0.1)
        freed_after = time.monotonic() - stopped
        print(f"gRPC: stalled reader's slot freed {freed_after:.1f} s after it stopped reading")
        assert freed_after <= SEND_TIMEOUT_S + 5
        assert secured.log_path.read_text(errors="replace").count("took no message") == cut_before + 1
        finish = None
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while (chunk := await call.read()) is not grpc.aio.EOF:  # what was in flight, then the status
                finish = (chunk.choices[0].finish_reason.string_value if chunk.choices else None) or finish
        assert caught.value.code() == grpc.StatusCode.CANCELLED, caught.value
        assert finish is None  # cut, never finished
        # the next call is served
        reply = await stub.CreateChatCompletion(chat_pb2.ChatCompletionRequest(
            model=DEFAULT_MODEL_ID, max_completion_tokens=4,
            messages=[chat_pb2.ChatMessage(role="user", content={"string_value": "hi"})]), metadata=metadata,
            timeout=30)
        assert reply.usage.completion_tokens == 4


def test_tokens_per_minute_window_slides():
    """The service's sliding window alone (a fake clock): refused once the last 60 s reach the limit, with the
    wait until enough of the oldest charges leave the window; other clients and unknown clients are free."""
    from genrpc.service.client_limits import TokenRateLimited, TokensPerMinute

    now = [1000.0]
    limits = TokensPerMinute({"a": 100, "b": 0}, clock=lambda: now[0])
    limits.charge("a", 60)
    now[0] += 20
    limits.check("a")  # 60 < 100
    limits.charge("a", 50)
    with pytest.raises(TokenRateLimited) as exc:
        limits.check("a")
    assert exc.value.metadata["retry_after_s"] == "40"  # the first 60 leave the window at t=1060
    assert "100 tokens per minute (tpm in the API keys file), 110 used" in exc.value.message
    limits.check("b")
    limits.check(None)
    limits.check("unknown")
    now[0] += 40
    limits.check("a")  # only the 50 charged at t=1020 remain
