"""Scaling out on loopback: three service replicas (tests/_scripted_replica.py: the real `genrpc.service.server`
with the scripted engine) behind one real Envoy with the product config (`grpc_upstreams`, health checks every
second), plus the real bridge for SSE streams. Which replica served what is read from each replica's own
/metrics (`genrpc_requests_total`), never from Envoy.

Covers: per-request spread over all replicas, prompt-cache affinity (prompt_cache_key, user, API client, gRPC
metadata; streams through the bridge spread per call), a draining replica (SIGTERM, NOT_SERVING) that gets
nothing new while its streams finish, and a killed replica that loses only its own in-flight requests.
test_real_model_replicas_spread_and_keys_stick repeats the spread and the affinity with two real `genrpc serve`
processes (bundled model) and the openai SDK. Prints the distributions and the failover timings (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from _procs import HOST, Proc, free_port, run_envoy, spawn, wait_until
from _stack_up import metric_sum, scrape
from genrpc.envoy import config as envoy_config
from genrpc.processes import grpc_serving, http_ok
from genrpc.v1 import chat_pb2, generation_service_pb2_grpc

MODEL = "scripted"
HEALTH_INTERVAL_S = 1.0
REPLICA_SCRIPT = Path(__file__).resolve().parent / "_scripted_replica.py"
REPLY_CHARS = 300  # _scripted_replica.REPLY


@dataclass
class Replica:
    name: str
    proc: Proc
    grpc_port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def served(self) -> int:
        """Finished RPCs of GenerationService on this replica (any method, any code)."""
        return round(metric_sum(scrape(f"http://{HOST}:{self.metrics_port}/metrics"), "genrpc_requests_total"))

    def running(self) -> int:
        """Requests this replica's engine is running now."""
        return round(metric_sum(scrape(f"http://{HOST}:{self.metrics_port}/metrics"), "genrpc_running_requests"))


@dataclass
class Cluster:
    replicas: list[Replica]
    envoy: object
    bridge: Proc
    bridge_port: int

    def served(self) -> list[int]:
        return [r.served() if r.proc.alive() else 0 for r in self.replicas]  # a killed replica serves nothing

    def envoy_hosts(self, cluster: str = envoy_config.GRPC_CLUSTER) -> dict[str, str]:
        """{host:port: health_flags} of an Envoy cluster, from admin /clusters."""
        text = httpx.get(f"{self.envoy.admin_url}/clusters", timeout=5).text
        return {m[1]: m[2] for m in re.finditer(rf"^{cluster}::([\d.]+:\d+)::health_flags::(\S+)$", text, re.M)}


def start_replica(tmp: Path, name: str, step_delay_s: float | None, grace_s: float) -> Replica:
    """A scripted replica (step_delay_s: seconds per generated character), or with step_delay_s=None the real
    `genrpc serve` with its default engine and the bundled model."""
    grpc_port, metrics_port = free_port(), free_port()
    env = {"GENRPC_HOST": HOST, "GENRPC_GRPC_PORT": str(grpc_port), "GENRPC_METRICS_PORT": str(metrics_port),
           "GENRPC_SHUTDOWN_GRACE_S": str(grace_s)}
    if step_delay_s is None:
        argv = [sys.executable, "-m", "genrpc.cli", "serve"]
        env["GENRPC_TORCH_THREADS"] = "1"  # two replicas on a shared 2-core machine
    else:
        argv = [sys.executable, str(REPLICA_SCRIPT), str(step_delay_s)]
        env["GENRPC_MODEL_ID"] = MODEL
    proc = spawn(name, argv, env=env, log_path=tmp / f"{name}.log")
    return Replica(name, proc, grpc_port, metrics_port)


@contextlib.contextmanager
def run_cluster(tmp: Path, *, step_delay_s: float | None = 0.002, grace_s: float = 30.0, count: int = 3,
                ready_timeout_s: float = 60, **envoy_options):
    replicas: list[Replica] = []
    bridge = None
    try:
        replicas = [start_replica(tmp, f"replica-{i}", step_delay_s, grace_s) for i in range(count)]
        for r in replicas:
            wait_until(grpc_serving(r.address), r.proc, ready_timeout_s, "SERVING")
        bridge_port = free_port()
        # the bridge balances per call over the replicas (round_robin + client-side health checks)
        target = "ipv4:" + ",".join(r.address for r in replicas)
        bridge = spawn("bridge", [sys.executable, "-m", "genrpc.cli", "bridge"], log_path=tmp / "bridge.log",
                       env={"GENRPC_HOST": HOST, "GENRPC_BRIDGE_PORT": str(bridge_port), "GENRPC_GRPC_TARGET": target})
        wait_until(http_ok(f"http://{HOST}:{bridge_port}/health"), bridge, 60, "healthy")
        with run_envoy(tmp, grpc_port=0, bridge_port=bridge_port,
                       grpc_upstreams=[(HOST, r.grpc_port) for r in replicas],
                       health_check_interval_s=HEALTH_INTERVAL_S, **envoy_options) as envoy:
            cluster = Cluster(replicas, envoy, bridge, bridge_port)
            # Envoy starts with every host unchecked: wait until it has seen all of them healthy
            wait_until(lambda: list(cluster.envoy_hosts().values()) == ["healthy"] * count
                       and list(cluster.envoy_hosts(envoy_config.AFFINITY_CLUSTER).values()) == ["healthy"] * count,
                       envoy.proc, 30, "seeing every replica healthy")
            yield cluster
    finally:
        if bridge is not None:
            bridge.stop()
        for r in replicas:
            r.proc.stop(timeout_s=5)


def chat_body(max_tokens: int = 2, model: str = MODEL, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **fields}


async def post_many(base_url: str, bodies: list[dict], *, headers: dict | None = None, concurrency: int = 12
                    ) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        async def one(body: dict) -> httpx.Response:
            async with limit:
                return await client.post("/v1/chat/completions", json=body, headers=headers or {})
        return await asyncio.gather(*(one(b) for b in bodies))


def delta(before: list[int], after: list[int]) -> list[int]:
    return [a - b for a, b in zip(after, before)]


def grpc_chat_request(max_tokens: int) -> chat_pb2.ChatCompletionRequest:
    request = chat_pb2.ChatCompletionRequest(model=MODEL, max_tokens=max_tokens)
    message = request.messages.add()
    message.role = "user"
    message.content.string_value = "hi"
    return request


def replica_of_key(cluster: Cluster, key: str) -> int:
    """Which replica a prompt_cache_key maps to: one request, then the replica whose count moved."""
    before = cluster.served()
    response = httpx.post(f"{cluster.envoy.base_url}/v1/chat/completions", json=chat_body(prompt_cache_key=key),
                          timeout=30)
    assert response.status_code == 200, response.text
    moved = [i for i, d in enumerate(delta(before, cluster.served())) if d]
    assert len(moved) == 1, moved
    return moved[0]


def keys_per_replica(cluster: Cluster, wanted: int = 2) -> dict[int, list[str]]:
    """prompt_cache_keys grouped by the replica they map to, at least `wanted` for each replica."""
    found: dict[int, list[str]] = collections.defaultdict(list)
    for n in range(200):
        key = f"conversation-{n}"
        found[replica_of_key(cluster, key)].append(key)
        if len(found) == 3 and all(len(v) >= wanted for v in found.values()):
            return found
    raise AssertionError(f"200 keys did not cover the replicas: {dict(found)}")


async def wait_running(cluster: Cluster, expected: dict[int, int], timeout_s: float = 20) -> None:
    """Polls the replicas' `genrpc_running_requests` gauges until they read `expected` ({replica: count})."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = {i: cluster.replicas[i].running() for i in expected}
        if running == expected:
            return
        assert time.monotonic() < deadline, f"running requests {running}, expected {expected}"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------------------------

def test_requests_spread_and_keys_stick(tmp_path):
    with run_cluster(tmp_path) as cluster:
        base = cluster.envoy.base_url
        before = cluster.served()
        responses = asyncio.run(post_many(base, [chat_body() for _ in range(300)]))
        assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
        keyless = delta(before, cluster.served())
        print(f"\n300 requests without an affinity key (LEAST_REQUEST) over three replicas: {keyless}")
        assert sum(keyless) == 300
        assert all(n >= 30 for n in keyless), keyless  # every replica takes a real share

        # 30 prompt_cache_keys x 10 requests, sent interleaved and concurrently: each key's requests all land on
        # one replica (measured key by key), and the keys spread over the replicas
        keys = [f"conversation-{n}" for n in range(30)]
        owner = {}
        totals = [0, 0, 0]
        for key in keys:
            before = cluster.served()
            responses = asyncio.run(post_many(base, [chat_body(prompt_cache_key=key) for _ in range(10)]))
            assert all(r.status_code == 200 for r in responses)
            moved = delta(before, cluster.served())
            assert sorted(moved) == [0, 0, 10], (key, moved)  # all ten on the same replica
            owner[key] = moved.index(10)
            totals = [t + m for t, m in zip(totals, moved)]
        print(f"300 requests with 30 prompt_cache_keys (MAGLEV) over three replicas: {totals}; "
              f"keys per replica: {[list(owner.values()).count(i) for i in range(3)]}")
        assert len(set(owner.values())) == 3, owner

        # the same key again, concurrently and mixed with other keys: still its replica
        before = cluster.served()
        mixed = [chat_body(prompt_cache_key=keys[0]) for _ in range(20)]
        responses = asyncio.run(post_many(base, mixed))
        assert all(r.status_code == 200 for r in responses)
        assert delta(before, cluster.served())[owner[keys[0]]] == 20


def test_affinity_sources_user_client_and_grpc_metadata(tmp_path):
    with run_cluster(tmp_path) as cluster:
        base = cluster.envoy.base_url

        def landing(send, times: int = 8) -> list[int]:
            before = cluster.served()
            for _ in range(times):
                send()
            return delta(before, cluster.served())

        def rest(headers=None, **fields):
            return lambda: httpx.post(f"{base}/v1/chat/completions", json=chat_body(**fields), headers=headers or {},
                                      timeout=30).raise_for_status()

        for name, send in [("user", rest(user="end-user-42")),
                           ("x-client-id", rest(headers={"x-client-id": "team-a"})),
                           ("x-genrpc-affinity header", rest(headers={"x-genrpc-affinity": "session-7"}))]:
            moved = landing(send)
            assert sorted(moved) == [0, 0, 8], (name, moved)

        # prompt_cache_key wins over user: same key with different users stays on the key's replica
        before = cluster.served()
        for n in range(8):
            rest(prompt_cache_key="shared-prefix", user=f"user-{n}")()
        moved = delta(before, cluster.served())
        assert sorted(moved) == [0, 0, 8], moved

        # native gRPC through Envoy: metadata x-genrpc-affinity pins, no metadata spreads
        with grpc.insecure_channel(f"{HOST}:{cluster.envoy.port}") as channel:
            stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
            moved = landing(lambda: stub.CreateChatCompletion(grpc_chat_request(2), timeout=30,
                                                              metadata=[("x-genrpc-affinity", "grpc-session")]))
            assert sorted(moved) == [0, 0, 8], moved
            before = cluster.served()
            futures = [stub.CreateChatCompletion.future(grpc_chat_request(2), timeout=30) for _ in range(60)]
            for f in futures:
                f.result()
            spread = delta(before, cluster.served())
            assert sum(spread) == 60 and all(spread), spread

        # SSE streams go through the bridge, whose channel balances per call over the replicas
        before = cluster.served()
        for _ in range(30):
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat_body(stream=True), timeout=30) as r:
                assert r.status_code == 200
                assert r.read().decode().rstrip().endswith("data: [DONE]")
        spread = delta(before, cluster.served())
        print(f"\n30 SSE streams via the bridge (round_robin per call): {spread}")
        assert sum(spread) == 30 and all(spread), spread


def test_api_clients_stick_by_their_key(tmp_path):
    """With API keys, Envoy's api_key_auth derives x-client-id from the Bearer key: without a prompt_cache_key or
    user, each client's requests stay on one replica; a prompt_cache_key still overrides it."""
    keys = {f"sk-scaleout-{n}": f"team-{n}" for n in range(6)}
    with run_cluster(tmp_path, api_keys=keys) as cluster:
        owners = {}
        for key in keys:
            before = cluster.served()
            responses = asyncio.run(post_many(cluster.envoy.base_url, [chat_body() for _ in range(8)],
                                              headers={"authorization": f"Bearer {key}"}))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            moved = delta(before, cluster.served())
            assert sorted(moved) == [0, 0, 8], (key, moved)
            owners[key] = moved.index(8)
        print(f"\n6 API clients x 8 requests: replica per client {list(owners.values())}")
        # a prompt_cache_key beats the client: one key from two clients lands on one replica
        before = cluster.served()
        for key in list(keys)[:2]:
            asyncio.run(post_many(cluster.envoy.base_url, [chat_body(prompt_cache_key="shared") for _ in range(4)],
                                  headers={"authorization": f"Bearer {key}"}))
        assert sorted(delta(before, cluster.served())) == [0, 0, 8]
        # no key at all: Envoy refuses before any replica sees the request
        before = cluster.served()
        assert httpx.post(f"{cluster.envoy.base_url}/v1/chat/completions", json=chat_body()).status_code == 401
        assert cluster.served() == before


def test_a_draining_replica_gets_nothing_new_while_its_streams_finish(tmp_path):
    # 300 characters at 20 ms: a 6 s stream, longer than the drain takes to be noticed
    with run_cluster(tmp_path, step_delay_s=0.02, grace_s=30) as cluster:
        keys = keys_per_replica(cluster)
        draining = 0
        victim = cluster.replicas[draining]
        victim_key = keys[draining][0]

        async def stream_on(key: str) -> tuple[str, str]:
            async with grpc.aio.insecure_channel(f"{HOST}:{cluster.envoy.port}") as channel:
                stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
                text, finish = [], ""
                async for chunk in stub.Chat(grpc_chat_request(REPLY_CHARS), timeout=60,
                                             metadata=[("x-genrpc-affinity", key)]):
                    for choice in chunk.choices:
                        text.append(choice.delta.content)
                        if choice.HasField("finish_reason") and choice.finish_reason.string_value:
                            finish = choice.finish_reason.string_value
                return "".join(text), finish

        async def scenario():
            streams = [asyncio.create_task(stream_on(victim_key)) for _ in range(3)]
            # the streams are in flight once the replica's engine runs them
            await wait_running(cluster, {draining: 3})
            t_sigterm = time.monotonic()
            victim.proc.process.send_signal(signal.SIGTERM)
            # until Envoy marks it unhealthy (failed active health check) in both clusters, requests keep coming:
            # the draining replica refuses new RPCs and Envoy retries them on another one
            in_window = []
            while not all("failed_active_hc" in cluster.envoy_hosts(c).get(victim.address, "")
                          for c in (envoy_config.GRPC_CLUSTER, envoy_config.AFFINITY_CLUSTER)):
                assert time.monotonic() - t_sigterm < 4 * HEALTH_INTERVAL_S + 5, cluster.envoy_hosts()
                in_window += await post_many(cluster.envoy.base_url,
                                             [chat_body()] * 6 + [chat_body(prompt_cache_key=victim_key)] * 3)
            t_out = time.monotonic() - t_sigterm
            assert in_window and all(r.status_code == 200 for r in in_window), \
                [r.text for r in in_window if r.status_code != 200]
            served_before = victim.served()
            # new requests, keyless and with the draining replica's own key: all served, none by it
            bodies = [chat_body() for _ in range(45)] + [chat_body(prompt_cache_key=victim_key) for _ in range(15)]
            responses = await post_many(cluster.envoy.base_url, bodies)
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
            assert victim.served() == served_before, "a draining replica got new requests"
            results = await asyncio.gather(*streams)
            t_streams = time.monotonic() - t_sigterm
            return t_out, t_streams, results, len(in_window)

        t_out, t_streams, results, window_count = asyncio.run(scenario())
        for text, finish in results:  # the three streams on the draining replica finished whole
            assert len(text) == REPLY_CHARS and finish == "stop", (len(text), finish)
        assert victim.proc.process.wait(timeout=30) == 0  # drained and exited cleanly
        print(f"\ndrain: SIGTERM -> Envoy stops sending to the replica after {t_out:.2f} s "
              f"(health check every {HEALTH_INTERVAL_S:.0f} s, 2 failures); its 3 streams finished "
              f"{t_streams:.2f} s after SIGTERM; {window_count} requests sent meanwhile all succeeded; 60 new requests "
              f"after it all served by the other two")


def test_a_killed_replica_loses_only_its_in_flight_requests(tmp_path):
    with run_cluster(tmp_path, step_delay_s=0.02) as cluster:
        keys = keys_per_replica(cluster)
        owner_before = {f"conversation-{n}": replica_of_key(cluster, f"conversation-{n}") for n in range(60)}
        killed = 1
        victim = cluster.replicas[killed]
        survivors = [i for i in range(3) if i != killed]

        async def stream_on(key: str) -> tuple[int, str | None]:
            """(characters received, gRPC error code name or None)."""
            async with grpc.aio.insecure_channel(f"{HOST}:{cluster.envoy.port}") as channel:
                stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
                received = 0
                try:
                    async for chunk in stub.Chat(grpc_chat_request(REPLY_CHARS), timeout=60,
                                                 metadata=[("x-genrpc-affinity", key)]):
                        received += sum(len(c.delta.content) for c in chunk.choices)
                except grpc.aio.AioRpcError as error:
                    return received, f"{error.code().name}: {error.details()}"
                return received, None

        async def rest_on(key: str) -> tuple[int, bytes]:
            async with httpx.AsyncClient(timeout=60) as client:
                async with client.stream("POST", f"{cluster.envoy.base_url}/v1/chat/completions",
                                         json=chat_body(max_tokens=REPLY_CHARS, prompt_cache_key=key)) as r:
                    return r.status_code, await r.aread()

        async def scenario():
            on_victim = [asyncio.create_task(stream_on(keys[killed][0])) for _ in range(2)]
            on_others = [asyncio.create_task(stream_on(keys[i][0])) for i in survivors]
            rest_on_victim = asyncio.create_task(rest_on(keys[killed][1]))
            # all in flight (each replica's engine runs its requests) before the kill
            await wait_running(cluster, {i: 3 if i == killed else 1 for i in range(3)})
            t_kill = time.monotonic()
            victim.proc.process.kill()

            async def flagged() -> float:  # until Envoy's /clusters shows the replica failed (health or outlier)
                while cluster.envoy_hosts().get(victim.address, "healthy") == "healthy":
                    assert time.monotonic() - t_kill < 4 * HEALTH_INTERVAL_S + 5, cluster.envoy_hosts()
                    await asyncio.sleep(0.02)
                return time.monotonic() - t_kill

            flagging = asyncio.create_task(flagged())
            # meanwhile new requests keep coming: keyless and for every key
            outcomes = []
            first_ok_after = None
            while time.monotonic() - t_kill < 4 * HEALTH_INTERVAL_S:
                bodies = [chat_body()] * 6 + [chat_body(prompt_cache_key=k) for v in keys.values() for k in v[:1]]
                sent_after = time.monotonic() - t_kill
                for r in await post_many(cluster.envoy.base_url, bodies):
                    outcomes.append((sent_after, r))
                    if r.status_code == 200 and first_ok_after is None:
                        first_ok_after = time.monotonic() - t_kill
            ejected = await flagging
            return (await asyncio.gather(*on_victim), await asyncio.gather(*on_others), await rest_on_victim,
                    outcomes, ejected, first_ok_after)

        lost, kept, rest_lost, outcomes, ejected, first_ok_after = asyncio.run(scenario())
        # the killed replica's streams end at once with an error, never a hang: Envoy had forwarded their response
        # headers, so it can only reset the client's stream, which gRPC reports as INTERNAL "RST_STREAM"
        for received, code in lost:
            assert received < REPLY_CHARS and (code.startswith("UNAVAILABLE") or
                                               code.startswith("INTERNAL") and "RST_STREAM" in code), (received, code)
        for received, code in kept:  # everyone else's streams finish whole
            assert code is None and received == REPLY_CHARS, (received, code)
        status, body = rest_lost  # a REST request in flight on it: a clean OpenAI-shaped 503
        assert status == 503 and json.loads(body)["error"]["type"] == "server_error", (status, body)
        # requests sent after the kill: served by the others (a connect failure to the dead one is retried on another
        # replica), except any Envoy had already put on the dead replica's connection before it saw it close: those
        # are in flight on it, and get a clean OpenAI-shaped 503; none once Envoy has flagged the replica
        failed = [(t, r) for t, r in outcomes if r.status_code != 200]
        print(f"\nkill -9 of one replica: its 2 gRPC streams -> {sorted({c.split(':')[0] for _, c in lost})}, "
              f"REST request -> {status}; {len(outcomes)} new requests in the {4 * HEALTH_INTERVAL_S:.0f} s after: "
              f"{len(failed)} failed ({', '.join(f'{r.status_code} sent at +{t:.3f} s' for t, r in failed)}); "
              f"first success {first_ok_after:.3f} s after the kill; Envoy flags the replica after {ejected:.2f} s")
        for t, r in failed:
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
            assert t < ejected, f"a request sent {t:.3f} s after the kill failed; flagged at {ejected:.3f} s"
        assert len(failed) <= 12  # at most one batch of requests raced the kill
        # consistent hashing: the killed replica's keys move to the survivors, the survivors keep (nearly all)
        # their own keys
        after = {key: replica_of_key(cluster, key) for key in owner_before}
        assert all(after[k] in survivors for k in owner_before)
        kept_keys = [k for k, i in owner_before.items() if i != killed]
        stayed = [k for k in kept_keys if after[k] == owner_before[k]]
        moved_keys = [k for k, i in owner_before.items() if i == killed]
        print(f"keys: {len(moved_keys)} of the killed replica's moved; {len(stayed)} of the survivors' "
              f"{len(kept_keys)} stayed put")
        assert len(stayed) >= 0.9 * len(kept_keys), (len(stayed), len(kept_keys))




def test_real_model_replicas_spread_and_keys_stick(tmp_path):
    """The same with two real `genrpc serve` processes (default engine, bundled model) and the official openai
    SDK: one prompt_cache_key stays on one replica, keyless requests reach both, streams spread via the bridge."""
    import openai

    from genrpc.settings import DEFAULT_MODEL_ID

    with run_cluster(tmp_path, step_delay_s=None, count=2, ready_timeout_s=600) as cluster:
        client = openai.OpenAI(base_url=f"{cluster.envoy.base_url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Say hi."}]

        before = cluster.served()
        for _ in range(4):
            # greedy: sampled at temperature 1, two tokens are sometimes half of a multi-byte character (an emoji
            # greeting), whose text is held back until it completes, so the content is empty (~1 in 40)
            reply = client.chat.completions.create(model=DEFAULT_MODEL_ID, max_tokens=2, messages=messages,
                                                   temperature=0, prompt_cache_key="support-bot-v1")
            assert reply.choices[0].message.content
        keyed = delta(before, cluster.served())
        assert sorted(keyed) == [0, 4], keyed

        before = cluster.served()
        responses = asyncio.run(post_many(cluster.envoy.base_url,
                                          [chat_body(model=DEFAULT_MODEL_ID) for _ in range(12)], concurrency=4))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        spread = delta(before, cluster.served())
        assert sum(spread) == 12 and all(spread), spread

        before = cluster.served()
        for _ in range(4):
            stream = client.chat.completions.create(model=DEFAULT_MODEL_ID, max_tokens=2, stream=True,
                                                    messages=messages)
            chunks = list(stream)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length"), chunks[-1]
        streamed = delta(before, cluster.served())
        assert sum(streamed) == 4 and all(streamed), streamed  # round_robin per call in the bridge
        print(f"\nreal model, 2 replicas: 4 requests with one prompt_cache_key -> {keyed}; 12 without -> {spread}; "
              f"4 SSE streams via the bridge -> {streamed}")


def test_render_lists_every_upstream_and_checks_health():
    text = envoy_config.render(listen_host=HOST, listen_port=1, admin_port=2, grpc_host=HOST, grpc_port=3,
                               bridge_host=HOST, bridge_port=4, descriptor_path="/x.pb",
                               grpc_upstreams=envoy_config.parse_upstreams("10.0.0.1:50051, 10.0.0.2:50052"),
                               health_check_interval_s=0.5)
    import yaml

    clusters = {c["name"]: c for c in yaml.safe_load(text)["static_resources"]["clusters"]}
    for name, policy in [(envoy_config.GRPC_CLUSTER, "LEAST_REQUEST"), (envoy_config.AFFINITY_CLUSTER, "MAGLEV")]:
        c = clusters[name]
        assert c["lb_policy"] == policy and c["type"] == "STATIC"
        addresses = [e["endpoint"]["address"]["socket_address"] for e in c["load_assignment"]["endpoints"][0]
                     ["lb_endpoints"]]
        assert [(a["address"], a["port_value"]) for a in addresses] == [("10.0.0.1", 50051), ("10.0.0.2", 50052)]
        check = c["health_checks"][0]
        assert check["grpc_health_check"]["service_name"] == "genrpc.v1.GenerationService"
        assert check["interval"] == check["no_traffic_interval"] == "0.5s"
        assert c["outlier_detection"]["enforcing_consecutive_gateway_failure"] == 100
    assert "health_checks" not in clusters[envoy_config.BRIDGE_CLUSTER]
    # a DNS name (a headless Service): STRICT_DNS keeps every address it resolves to
    dns = yaml.safe_load(envoy_config.render(listen_host=HOST, listen_port=1, admin_port=2, grpc_host=HOST,
                                             grpc_port=3, bridge_host=HOST, bridge_port=4, descriptor_path="/x.pb",
                                             grpc_upstreams=[("genrpc-service-pods", 50051)]))
    assert {c["name"]: c["type"] for c in dns["static_resources"]["clusters"]}[envoy_config.GRPC_CLUSTER] \
        == "STRICT_DNS"
    with pytest.raises(ValueError, match="expected host:port"):
        envoy_config.parse_upstreams("10.0.0.1")
    with pytest.raises(ValueError, match="health_check_interval_s"):
        envoy_config.render(listen_host=HOST, listen_port=1, admin_port=2, grpc_host=HOST, grpc_port=3,
                            bridge_host=HOST, bridge_port=4, descriptor_path="/x.pb", health_check_interval_s=0)
    assert envoy_config.parse_upstreams("genrpc-service-pods:50051, [::1]:7") == [("genrpc-service-pods", 50051),
                                                                                ("::1", 7)]
