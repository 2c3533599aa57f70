"""The playground page in a real browser: Debian's headless Chromium (driven by selenium through Debian's
chromedriver; `make test` installs both) loads the page from the running stack through Envoy, chats with the real
model, stops an answer mid-stream (the service's running-requests gauge must fall back to 0) and shows the
server's error messages. Screenshots land in the test's tmp folder."""

from __future__ import annotations

import asyncio
import re
import shutil
import time

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from _procs import run_envoy
from test_envoy_config import MODEL, backend, bridge  # noqa: F401 - fixtures: scripted gRPC service + the real bridge

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


async def test_page_is_public_self_contained_and_the_api_keeps_its_keys(tmp_path, backend, bridge):  # noqa: F811
    """Through the real Envoy with API keys on: `/` redirects to the page, the page loads without a key (so
    the user can type one in), carries its CSS and JS inline under a CSP that allows only them and its own origin,
    and the API it calls still refuses a request without the key."""
    with run_envoy(tmp_path, grpc_port=backend[1], bridge_port=bridge.bridge_port, name="envoy-playground",
                   api_keys={"sk-page": "web"}) as envoy:
        async with httpx.AsyncClient(base_url=envoy.base_url, timeout=30) as http:
            root = await http.get("/")
            assert root.status_code == 302 and root.headers["location"] == "playground"
            page = await http.get("/playground")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            html = page.text
            assert "<title>genrpc playground</title>" in html and "<style>" in html and "<script>" in html
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page must not load anything remote"
            csp = page.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'sha256-" in csp
            assert (await http.get("/v1/models")).status_code == 401
            models = await http.get("/v1/models", headers={"authorization": "Bearer sk-page"})
            assert models.status_code == 200 and models.json()["data"]
            # only GET is public: any other method on the page's path is an API call and needs the key
            assert (await http.post("/playground")).status_code == 401


def wait_for(predicate, timeout_s: float, what: str):
    """Bounded poll of an observable condition; returns its last truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} missing: `make test` installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,860",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def assistant_messages(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def stats_of(driver, message) -> dict[str, str]:
    """The answer's stats, read in one script (the page re-renders them with every chunk)."""
    return driver.execute_script(
        "return Object.fromEntries([...arguments[0].querySelectorAll('.stat')]"
        ".map((s) => [s.dataset.stat, s.querySelector('b').textContent]));", message)


def set_value(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));",
                          field, value)


def send(driver, text: str) -> None:
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_playground_chat_stop_and_errors(stack, browser, tmp_path):
    driver = browser
    # `/` redirects to the page; everything comes through Envoy
    driver.get(f"http://{stack.envoy_address}/")
    assert driver.current_url.endswith("/playground")
    assert driver.title == "genrpc playground"

    # the model picker is filled from GET /v1/models
    picker = Select(driver.find_element(By.ID, "model"))
    wait_for(lambda: stack.model in [o.get_attribute("value") for o in picker.options], 30, "the model list")
    assert picker.first_selected_option.get_attribute("value") == stack.model

    # 1. a short answer streams in, then its stats are filled in
    set_value(driver, "temperature", "0")
    set_value(driver, "max_tokens", "24")
    send(driver, "What is the capital of France?")
    first = wait_for(lambda: assistant_messages(driver), 10, "the answer bubble")[0]
    wait_for(lambda: first.find_element(By.CSS_SELECTOR, ".content").text.strip(), 120, "streamed text")
    wait_for(lambda: "finish" in stats_of(driver, first), 120, "the end of the answer")
    stats = stats_of(driver, first)
    assert stats["finish"] in ("stop", "length"), stats
    assert re.fullmatch(r"\d+ ms", stats["ttft"]), stats
    assert re.fullmatch(r"\d+\.\d tok/s", stats["speed"]), stats
    usage = re.fullmatch(r"(\d+) in · (\d+) out · (\d+) total", stats["usage"])
    assert usage and int(usage[1]) > 0 and 0 < int(usage[2]) <= 24, stats
    assert int(usage[1]) + int(usage[2]) == int(usage[3])
    assert driver.find_element(By.ID, "send").is_displayed()

    # 2. a long answer: Stop mid-stream aborts the fetch; Envoy and the bridge cancel the generation
    wait_for(lambda: stack.running_requests() == 0, 30, "an idle engine")
    set_value(driver, "max_tokens", "2000")
    send(driver, "Write a long story about a dragon who learns to cook.")
    second = wait_for(lambda: assistant_messages(driver)[1:], 10, "the second answer bubble")[0]
    content = second.find_element(By.CSS_SELECTOR, ".content")
    wait_for(lambda: len(content.text.split()) >= 5, 120, "a few streamed words")
    assert stack.running_requests() == 1
    streamed_before_stop = content.text
    driver.find_element(By.ID, "stop").click()
    wait_for(lambda: stats_of(driver, second).get("finish") == "stopped", 10, "the answer marked stopped")
    wait_for(lambda: stack.running_requests() == 0, 15, "genrpc_running_requests back to 0 after Stop")
    assert content.text.startswith(streamed_before_stop.rstrip("▍").strip()[:20])
    assert driver.find_element(By.ID, "send").is_displayed() and not driver.find_element(By.ID, "stop").is_displayed()
    driver.save_screenshot(str(tmp_path / "playground.png"))

    # 3. a request the server refuses: the page shows the server's own message (OpenAI error body)
    set_value(driver, "max_tokens", "16")
    set_value(driver, "top_p", "1")
    driver.execute_script("document.getElementById('temperature').max = '5';")
    set_value(driver, "temperature", "3")
    send(driver, "Hello?")
    error = driver.find_element(By.ID, "error")
    wait_for(lambda: error.is_displayed() and error.text, 30, "the error message")
    assert "temperature" in error.text.lower(), error.text
    # the refused turn left the conversation; its text is back in the box, to fix and resend
    assert len(assistant_messages(driver)) == 2 and len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == "Hello?"
    driver.save_screenshot(str(tmp_path / "playground-error.png"))

    # the page loaded nothing from elsewhere and broke no Content-Security-Policy rule
    problems = [e["message"] for e in driver.get_log("browser")
                if "Content Security Policy" in e["message"]]
    assert not problems, problems
    assert (tmp_path / "playground.png").stat().st_size > 10_000


def _key_and_error_scenario(driver, base_url: str) -> None:
    driver.get(f"{base_url}/playground")
    error = driver.find_element(By.ID, "error")
    # Envoy requires a key: the model list fails with Envoy's own (OpenAI-shaped) message
    wait_for(lambda: error.is_displayed() and error.text, 20, "the missing-key error")
    assert "Client authentication failed" in error.text, error.text
    key = driver.find_element(By.ID, "api-key")
    key.send_keys("sk-page")
    driver.find_element(By.ID, "system").click()  # leaving the field applies the key
    picker = Select(driver.find_element(By.ID, "model"))
    wait_for(lambda: MODEL in [o.get_attribute("value") for o in picker.options], 20, "the model list")
    assert not error.is_displayed()

    send(driver, "hi")
    answer = wait_for(lambda: assistant_messages(driver), 10, "the answer bubble")[0]
    wait_for(lambda: "finish" in stats_of(driver, answer), 20, "the end of the answer")
    assert answer.find_element(By.CSS_SELECTOR, ".content").text == "Hello world"
    stats = stats_of(driver, answer)
    assert stats["finish"] == "stop" and stats["usage"] == "5 in · 4 out · 9 total", stats

    # a stream that fails after it started: the SSE error event's message is shown, the partial answer kept
    driver.execute_script("const s = document.getElementById('model'); s.add(new Option('midfail', 'midfail'));"
                          "s.value = 'midfail';")
    send(driver, "hi again")
    failed = wait_for(lambda: assistant_messages(driver)[1:], 10, "the second answer bubble")[0]
    wait_for(lambda: error.is_displayed() and error.text, 20, "the mid-stream error")
    assert "engine failed mid-stream" in error.text, error.text
    assert stats_of(driver, failed)["finish"] == "error"
    assert failed.find_element(By.CSS_SELECTOR, ".content").text == "Hello"


async def test_playground_api_key_and_stream_errors(tmp_path, backend, bridge, browser):  # noqa: F811
    """The API-key field and the error display, in the browser, against the scripted service behind the real
    bridge and Envoy (with keys on). The browser is driven from a thread: the scripted service and the bridge
    run on this test's event loop."""
    with run_envoy(tmp_path, grpc_port=backend[1], bridge_port=bridge.bridge_port, name="envoy-playground-keys",
                   api_keys={"sk-page": "web"}) as envoy:
        await asyncio.to_thread(_key_and_error_scenario, browser, envoy.base_url)
        authorized = [md for method, _, md in backend[0].calls if method == "Chat"]
        assert authorized and all(md.get("x-client-id") == "web" for md in authorized)
