// The playground: a chat that streams from the edge's /v1/chat/completions with the
// workspace's playground key, showing each turn's tokens and exact cost (usage.cost_nano_usd,
// the server's integer, written as decimal dollars: never recomputed here) and the balance
// after it.
(function () {
  "use strict";
  var root = document.getElementById("playground");
  if (!root) { return; }
  var key = root.getAttribute("data-key");
  var messages = [];
  var log = document.getElementById("messages");
  var errorBox = document.getElementById("pg-error");
  var prompt = document.getElementById("prompt");
  var send = document.getElementById("send");

  function bubble(role, text) {
    var div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }

  // Exact dollars of an integer of nano-USD: 42000 → "0.000042", 5000000000 → "5.00".
  function usd(nano) {
    var whole = Math.floor(nano / 1e9);
    var frac = String(nano % 1e9).padStart(9, "0").replace(/0+$/, "");
    while (frac.length < 2) { frac += "0"; }
    return whole + "." + frac;
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = false;
  }

  function refreshBalance() {
    return fetch("/dashboard/api/workspace", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (ws) {
        if (ws) { document.getElementById("balance").textContent = "$" + ws.balance_usd; }
      });
  }

  function body() {
    var all = [];
    var system = document.getElementById("system").value.trim();
    if (system) { all.push({ role: "system", content: system }); }
    var request = {
      model: document.getElementById("model").value,
      messages: all.concat(messages),
      max_tokens: parseInt(document.getElementById("max-tokens").value, 10) || 64,
      stream: true,
      stream_options: { include_usage: true },
    };
    var temperature = parseFloat(document.getElementById("temperature").value);
    if (isFinite(temperature)) { request.temperature = temperature; }
    return JSON.stringify(request);
  }

  async function turn(text) {
    errorBox.hidden = true;
    messages.push({ role: "user", content: text });
    bubble("user", text);
    var response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Authorization": "Bearer " + key, "Content-Type": "application/json" },
      body: body(),
    });
    if (!response.ok) {
      messages.pop();
      var failure = await response.json().catch(function () { return null; });
      var message = failure && failure.error ? failure.error.message : "HTTP " + response.status;
      showError(response.status + ": " + message);
      root.setAttribute("data-last-status", String(response.status));
      return;
    }
    root.setAttribute("data-last-status", "200");
    var answer = bubble("assistant", "");
    var content = "";
    var usage = null;
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    for (;;) {
      var part = await reader.read();
      if (part.done) { break; }
      buffer += decoder.decode(part.value, { stream: true });
      var events = buffer.split("\n\n");
      buffer = events.pop();
      events.forEach(function (event) {
        var line = event.trim();
        if (line.indexOf("data: ") !== 0) { return; }
        var payload = line.slice(6);
        if (payload === "[DONE]") { return; }
        var chunk = JSON.parse(payload);
        if (chunk.error) { showError(chunk.error.message); return; }
        if (chunk.choices && chunk.choices.length && chunk.choices[0].delta.content) {
          content += chunk.choices[0].delta.content;
          answer.textContent = content;
          answer.setAttribute("data-chunks", String(Number(answer.getAttribute("data-chunks") || 0) + 1));
        }
        if (chunk.usage) { usage = chunk.usage; }
      });
    }
    messages.push({ role: "assistant", content: content });
    if (usage) {
      var meta = document.createElement("span");
      meta.className = "turn-meta";
      meta.textContent = usage.prompt_tokens + " prompt + " + usage.completion_tokens +
        " completion tokens · $" + usd(usage.cost_nano_usd);
      answer.appendChild(meta);
    }
    await refreshBalance();
  }

  document.getElementById("composer").addEventListener("submit", function (event) {
    event.preventDefault();
    var text = prompt.value.trim();
    if (!text) { return; }
    prompt.value = "";
    send.disabled = true;
    turn(text).catch(function (error) { showError(String(error)); })
      .finally(function () { send.disabled = false; });
  });
  document.getElementById("reset").addEventListener("click", function () {
    messages = [];
    log.textContent = "";
    errorBox.hidden = true;
  });
})();
