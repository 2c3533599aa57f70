"use strict";
// The genrpc playground: the public OpenAI REST API from the browser. URLs are relative to the page, so the
// same page works through Envoy, on the bridge alone, or under a path prefix.
(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"), system: $("system"), temperature: $("temperature"), topP: $("top_p"),
    maxTokens: $("max_tokens"), seed: $("seed"), apiKey: $("api-key"), messages: $("messages"), empty: $("empty"),
    error: $("error"), composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    newChat: $("new-chat"),
  };
  const history = [];  // {role, content}: the conversation sent with every request (system prompt excluded)
  let controller = null;  // AbortController of the answer being streamed

  // ---- settings -------------------------------------------------------------------------------------------
  const KEY_STORE = "genrpc-playground-api-key";
  els.apiKey.value = sessionStorage.getItem(KEY_STORE) || "";
  els.apiKey.addEventListener("change", () => { sessionStorage.setItem(KEY_STORE, els.apiKey.value.trim()); loadModels(); });
  for (const [input, out] of [[els.temperature, $("temperature-value")], [els.topP, $("top_p-value")]]) {
    const show = () => { out.textContent = input.value; };
    input.addEventListener("input", show);
    show();
  }

  function headers() {
    const h = { "content-type": "application/json", accept: "application/json, text/event-stream" };
    const key = els.apiKey.value.trim();
    if (key) h.authorization = `Bearer ${key}`;
    return h;
  }

  // The server's own message: OpenAI's {"error": {"message"}} (also what Envoy's replies are shaped as).
  async function errorMessage(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error) return body.error.message || JSON.stringify(body.error);
    } catch (_) { /* not JSON */ }
    return `HTTP ${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  async function loadModels() {
    try {
      const response = await fetch("v1/models", { headers: headers() });
      if (!response.ok) throw new Error(await errorMessage(response));
      const { data } = await response.json();
      const previous = els.model.value;
      els.model.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
      if (data.some((m) => m.id === previous)) els.model.value = previous;
      showError("");
    } catch (e) {
      els.model.replaceChildren(new Option("(no models)", ""));
      showError(`Could not list models: ${e.message}`);
    }
  }

  // ---- rendering ------------------------------------------------------------------------------------------
  function addMessage(role, text) {
    els.empty.hidden = true;
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role;
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    div.append(label, content);
    if (role === "assistant") {
      const stats = document.createElement("div");
      stats.className = "stats";
      div.append(stats);
    }
    els.messages.append(div);
    scrollDown();
    return div;
  }

  function scrollDown() {
    els.messages.scrollTop = els.messages.scrollHeight;
  }

  function stat(stats, name, label, value, extraClass = "") {
    const span = document.createElement("span");
    span.className = `stat ${name} ${extraClass}`.trim();
    span.dataset.stat = name;
    span.append(`${label} `);
    const b = document.createElement("b");
    b.textContent = value;
    span.append(b);
    stats.append(span);
  }

  function renderStats(div, s) {
    const stats = div.querySelector(".stats");
    stats.replaceChildren();
    if (s.ttft != null) stat(stats, "ttft", "TTFT", `${Math.round(s.ttft)} ms`);
    if (s.tokensPerSecond != null) stat(stats, "speed", "", `${s.tokensPerSecond.toFixed(1)} tok/s`);
    if (s.usage) {
      const u = s.usage;
      stat(stats, "usage", "tokens", `${u.prompt_tokens} in · ${u.completion_tokens} out · ${u.total_tokens} total`);
    }
    if (s.finish) stat(stats, "finish", "", s.finish, `finish-${s.finish}`);
  }

  function setBusy(busy) {
    els.send.hidden = busy;
    els.stop.hidden = !busy;
    els.model.disabled = busy;
    els.newChat.disabled = busy;
  }

  // ---- streaming ------------------------------------------------------------------------------------------
  // Yields the JSON payload of each `data:` event of an SSE body; stops at `data: [DONE]`. A body that ends
  // without it was cut short (the server sends an error event first when it knows why).
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("The stream ended before it was complete (no data: [DONE]); the connection was lost.");
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  function requestBody() {
    const messages = [];
    const system = els.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const body = {
      model: els.model.value, messages, stream: true, stream_options: { include_usage: true },
      temperature: Number(els.temperature.value), top_p: Number(els.topP.value),
    };
    if (els.maxTokens.value) body.max_tokens = Number(els.maxTokens.value);
    if (els.seed.value !== "") body.seed = Number(els.seed.value);
    return body;
  }

  async function send(text) {
    showError("");
    history.push({ role: "user", content: text });
    const userDiv = addMessage("user", text);
    const div = addMessage("assistant", "");
    div.classList.add("streaming");
    const content = div.querySelector(".content");
    const s = { ttft: null, tokensPerSecond: null, usage: null, finish: null };
    let answer = "";
    let chunks = 0;
    let firstAt = null;
    let lastAt = null;
    controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const chunk of sseEvents(response.body)) {
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const now = performance.now();
        for (const choice of chunk.choices || []) {
          const delta = (choice.delta && choice.delta.content) || "";
          if (delta) {
            if (firstAt === null) { firstAt = now; s.ttft = now - started; }
            lastAt = now;
            chunks += 1;
            answer += delta;
            content.textContent = answer;
          }
          if (choice.finish_reason) s.finish = choice.finish_reason;
        }
        if (chunk.usage) s.usage = chunk.usage;
        // decode speed: tokens after the first over the time since the first
        const tokens = s.usage ? s.usage.completion_tokens : chunks;
        if (firstAt !== null && lastAt > firstAt && tokens > 1) s.tokensPerSecond = (tokens - 1) / ((lastAt - firstAt) / 1000);
        renderStats(div, s);
        scrollDown();
      }
    } catch (e) {
      if (e.name === "AbortError") {
        s.finish = "stopped";
      } else {
        s.finish = "error";
        showError(e.message);
      }
      renderStats(div, s);
    } finally {
      controller = null;
      div.classList.remove("streaming");
      setBusy(false);
      if (answer) history.push({ role: "assistant", content: answer });
      else if (s.finish === "error") {
        // nothing came back: take the turn off the page and give the text back, to fix and retry
        history.pop();
        userDiv.remove();
        div.remove();
        if (!els.prompt.value) els.prompt.value = text;
      }
      els.prompt.focus();
    }
  }

  // ---- events ---------------------------------------------------------------------------------------------
  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.prompt.value.trim();
    if (!text || controller) return;
    if (!els.model.value) { showError("No model selected (is the server up? does it need an API key?)"); return; }
    els.prompt.value = "";
    send(text);
  });
  els.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.composer.requestSubmit();
    }
  });
  // Aborting the fetch closes the connection: Envoy and the bridge cancel the generation on the server.
  els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
  els.newChat.addEventListener("click", () => {
    history.length = 0;
    els.messages.querySelectorAll(".msg").forEach((m) => m.remove());
    els.empty.hidden = false;
    showError("");
    els.prompt.focus();
  });

  loadModels();
  els.prompt.focus();
})();
