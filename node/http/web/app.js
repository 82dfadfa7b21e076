// expertmesh page: ask (streamed), rate, and see the network and what the router learns.
// Plain JavaScript and hand-made SVG; everything comes from this node's own API.
"use strict";

(() => {
  const NETWORK_REFRESH_MS = 4000;
  const LEARNING_REFRESH_MS = 8000;
  const HISTORY_MESSAGES = 8; // earlier turns sent along, so small models keep some context without overflowing it
  const PALETTE = ["#3b6ea8", "#e0913a", "#4e9a76", "#b65c8f", "#7a68b3", "#c9a227", "#5aa6c8", "#a0522d"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    nodeId: null,
    history: [], // [{role, content}] of finished turns
    streaming: null, // AbortController of the answer being streamed
    tab: "chat",
    timers: {},
  };

  // ---- small DOM helpers ------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
    return node;
  }

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "data") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function showMessage(node, text) {
    node.textContent = text || "";
    node.hidden = !text;
  }

  const shortNode = (id) => (id && id.length > 10 ? id.slice(0, 8) + "…" : id || "?");
  const fmt = (x, digits = 2) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–");
  const pct = (x) => (typeof x === "number" && isFinite(x) ? Math.round(x * 100) + "%" : "–");

  function expertLabel(id) {
    // "smollm2-135m@b179c9523d0e": the name strong, the hash quiet.
    const at = String(id).lastIndexOf("@");
    if (at <= 0) return el("span", { class: "expert", text: id });
    return el("span", { class: "expert" }, id.slice(0, at), el("span", { class: "hash", text: id.slice(at) }));
  }

  function expertName(id) {
    const at = String(id).lastIndexOf("@");
    return at > 0 ? id.slice(0, at) : String(id);
  }

  function ago(ms) {
    if (typeof ms !== "number" || !ms) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function clockTime(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  // ---- the API ------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorOf(response) {
    // OpenAI's error body when there is one; otherwise whatever the server said.
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return new ApiError(response.status, body.error.message);
    } catch (_) {
      /* not JSON */
    }
    const detail = text.trim().slice(0, 300) || response.statusText || "request failed";
    return new ApiError(response.status, `${response.status}: ${detail}`);
  }

  // A node listening beyond loopback wants its API key; the page asks once and remembers it.
  const KEY_STORAGE = "expertmesh.apiKey";

  function withKey(options) {
    const key = window.localStorage.getItem(KEY_STORAGE);
    if (!key) return options;
    return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } };
  }

  async function request(path, options = {}, askedForKey = false) {
    let response;
    try {
      response = await fetch(path, { cache: "no-store", ...withKey(options) });
    } catch (exc) {
      if (exc.name === "AbortError") throw exc;
      throw new ApiError(0, `Cannot reach the node (${exc.message}).`);
    }
    if (response.status === 401 && !askedForKey) {
      const key = window.prompt("This node needs its API key (the file api_key in its data dir):");
      if (key && key.trim()) {
        window.localStorage.setItem(KEY_STORAGE, key.trim());
        return request(path, options, true);
      }
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async function getJson(path) {
    return (await request(path)).json();
  }

  function postJson(path, body, signal) {
    return request(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
  }

  // ---- tabs ---------------------------------------------------------------------------------

  const TABS = ["chat", "network", "learning"];
  const REFRESHERS = {
    network: [refreshNetwork, NETWORK_REFRESH_MS],
    learning: [refreshLearning, LEARNING_REFRESH_MS],
  };

  function showTab(name, { focus = false } = {}) {
    if (!TABS.includes(name)) name = "chat";
    state.tab = name;
    for (const tab of TABS) {
      const button = $("tab-" + tab);
      const selected = tab === name;
      button.setAttribute("aria-selected", String(selected));
      button.tabIndex = selected ? 0 : -1;
      $("view-" + tab).hidden = !selected;
    }
    if (focus) $("tab-" + name).focus();
    if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
    if (name === "chat") loadModels();
    scheduleRefresh();
  }

  function scheduleRefresh() {
    // Poll only the visible view, and nothing while the page is in the background.
    for (const [name, timer] of Object.entries(state.timers)) {
      clearTimeout(timer);
      delete state.timers[name];
    }
    const entry = REFRESHERS[state.tab];
    if (!entry || document.visibilityState === "hidden") return;
    const [refresh, intervalMs] = entry;
    const tab = state.tab;
    const tick = async () => {
      await refresh();
      if (state.tab === tab && document.visibilityState !== "hidden") {
        state.timers[tab] = setTimeout(tick, intervalMs);
      }
    };
    tick();
  }

  function setupTabs() {
    for (const tab of TABS) $("tab-" + tab).addEventListener("click", () => showTab(tab));
    document.querySelector(".tabs").addEventListener("keydown", (event) => {
      const index = TABS.indexOf(state.tab);
      const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: TABS.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      showTab(TABS[(moves[event.key] + TABS.length) % TABS.length], { focus: true });
    });
    window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
    document.addEventListener("visibilitychange", scheduleRefresh);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(redrawCharts, 200);
    });
  }

  // ---- who this node is -----------------------------------------------------------------------

  async function loadNode() {
    try {
      const health = await getJson("/healthz");
      state.nodeId = health.node_id;
      $("node-id").textContent = "node " + health.node_id;
      $("node-id").title = "This node's id: " + health.node_id;
    } catch (exc) {
      $("node-id").textContent = "node unreachable";
    }
  }

  // ---- chat ---------------------------------------------------------------------------------

  async function loadModels() {
    const select = $("model");
    try {
      const body = await getJson("/v1/models");
      const chosen = select.value;
      const models = (body.data || []).filter((m) => m.id !== "auto");
      models.sort((a, b) => Number(!!(b.expertmesh || {}).local) - Number(!!(a.expertmesh || {}).local) || a.id.localeCompare(b.id));
      const options = [el("option", { value: "auto", text: "auto — let the network choose" })];
      for (const model of models) {
        const local = (model.expertmesh || {}).local;
        const where = local ? "this node" : "node " + shortNode(model.owned_by);
        options.push(el("option", { value: model.id, text: `${model.id} · ${where}` }));
      }
      select.replaceChildren(...options);
      if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
      if ($("ask-error").dataset.source === "models") showAskError("");
    } catch (exc) {
      showAskError(`Could not load the list of experts: ${exc.message}`, "models");
    }
  }

  function showAskError(text, source = "") {
    showMessage($("ask-error"), text);
    $("ask-error").dataset.source = text ? source : "";
  }

  function routingOf(chunk) {
    // Routing details live in the chunk's `expertmesh` object (top level accepted too).
    const meta = chunk.expertmesh || {};
    const pick = (key) => (meta[key] !== undefined ? meta[key] : chunk[key]);
    return {
      expert: meta.expert || chunk.model,
      node: meta.node,
      decisionId: pick("decision_id"),
      token: pick("feedback_token"),
      probability: pick("probability"),
      explanation: pick("explanation"),
    };
  }

  function answerView() {
    const who = el("div", { class: "who" }, el("span", { class: "muted", text: "finding an expert…" }));
    const text = el("div", { class: "text pending" });
    const error = el("p", { class: "error", role: "alert", hidden: true });
    const foot = el("div", { class: "foot", hidden: true });
    const why = el("div");
    const root = el("article", { class: "msg answer", data: { state: "waiting" } }, who, text, error, foot, why);
    return { root, who, text, error, foot, why, routing: null };
  }

  function renderWho(view, routing) {
    const parts = [expertLabel(routing.expert || "unknown expert")];
    if (routing.node) {
      parts.push(el("span", { text: "on" }), el("span", { class: "node-id", title: routing.node, text: shortNode(routing.node) }));
      if (routing.node === state.nodeId) parts.push(el("span", { class: "badge", text: "this node" }));
    }
    if (typeof routing.probability === "number") {
      parts.push(el("span", { class: "badge prob", title: "probability the router gave this expert", text: "p " + pct(routing.probability) }));
    }
    view.who.replaceChildren(...parts);
    view.root.dataset.expert = routing.expert || "";
    view.root.dataset.node = routing.node || "";
    if (routing.decisionId) view.root.dataset.decisionId = routing.decisionId;
    if (routing.explanation) view.why.replaceChildren(explanationView(routing));
  }

  function explanationView(routing) {
    const x = routing.explanation || {};
    const body = el("div", { class: "why-body" });
    if (x.task) body.append(el("p", {}, "Kind of question: ", el("strong", { text: x.task })));
    const candidates = Array.isArray(x.candidates) ? x.candidates : [];
    if (candidates.length) {
      const rows = candidates.map((c) => {
        const chosen = c.expert === routing.expert && (!routing.node || c.node === routing.node);
        return el(
          "tr",
          { class: chosen ? "chosen" : null },
          el("td", { class: "expert-cell" }, expertName(c.expert), chosen ? " ✓" : ""),
          el("td", { class: "muted", title: c.node || "" , text: shortNode(c.node) }),
          el("td", {}, meter(c.probability)),
          el("td", { text: pct(c.probability) })
        );
      });
      body.append(
        el("p", { text: "The router weighed these experts (chance of each being picked):" }),
        el("table", {}, el("tbody", {}, ...rows))
      );
    }
    const features = Array.isArray(x.top_features) ? x.top_features : [];
    if (features.length) {
      body.append(
        el("p", { text: "What counted most for this pick:" }),
        el("ul", {}, ...features.map(([name, weight]) =>
          el("li", {}, el("code", { text: name }), " ", el("span", { class: "muted", text: (weight >= 0 ? "+" : "") + fmt(weight, 3) }))))
      );
    }
    return el("details", { class: "why" }, el("summary", { text: "Why this expert?" }), body);
  }

  function meter(fraction) {
    const bar = el("span");
    bar.style.width = Math.max(0, Math.min(1, Number(fraction) || 0)) * 100 + "%";
    return el("span", { class: "meter", "aria-hidden": "true" }, bar);
  }

  function thumbIcon(down) {
    // Drawn rather than an emoji, so it looks the same on machines without an emoji font.
    return svg("svg", { class: "icon", viewBox: "0 0 24 24", width: 18, height: 18, "aria-hidden": "true" },
      svg("g", { transform: down ? "rotate(180 12 12)" : null },
        svg("rect", { x: 2.5, y: 10, width: 4, height: 11, rx: 1 }),
        svg("path", { d: "M6.5 11 10.6 3.6c1.5 0 2.6 1.1 2.4 2.6l-.5 3.3h5.6c1.4 0 2.5 1.3 2.2 2.7l-1.4 6.8c-.2 1.2-1.2 2-2.4 2H6.5Z" })));
  }

  function renderThumbs(view, routing) {
    if (!routing || !routing.decisionId) {
      view.foot.hidden = true; // a pinned expert: nothing was routed, so nothing to rate
      return;
    }
    const status = el("span", { class: "feedback-status", role: "status" });
    const up = el("button", { type: "button", class: "thumb", "aria-label": "Good answer", title: "Good answer", "aria-pressed": "false", data: { rating: "up" } }, thumbIcon(false));
    const down = el("button", { type: "button", class: "thumb", "aria-label": "Bad answer", title: "Bad answer", "aria-pressed": "false", data: { rating: "down" } }, thumbIcon(true));
    const rate = async (rating, button) => {
      up.disabled = down.disabled = true;
      status.className = "feedback-status";
      status.textContent = "sending…";
      try {
        await postJson("/v1/feedback", { decision_id: routing.decisionId, token: routing.token, rating });
        button.setAttribute("aria-pressed", "true");
        status.classList.add("ok");
        status.textContent = "recorded — thank you";
      } catch (exc) {
        status.className = "feedback-status error";
        status.textContent = exc.message;
        // A refusal (4xx) will not change on retry; a lost connection or server error may.
        if (!(exc.status >= 400 && exc.status < 500)) up.disabled = down.disabled = false;
      }
    };
    up.addEventListener("click", () => rate("up", up));
    down.addEventListener("click", () => rate("down", down));
    view.foot.replaceChildren(el("span", { class: "muted small", text: "Was this helpful?" }), up, down, status);
    view.foot.hidden = false;
  }

  function setStreaming(controller) {
    state.streaming = controller;
    const send = $("send");
    send.textContent = controller ? "Stop" : "Send";
    send.classList.toggle("primary", !controller);
    send.classList.toggle("quiet", !!controller);
  }

  async function ask(question, model) {
    $("chat-hint").hidden = true;
    const conversation = $("conversation");
    const view = answerView();
    conversation.append(el("div", { class: "msg user", text: question }), view.root);
    view.root.scrollIntoView({ block: "end", behavior: "smooth" });

    const messages = [...state.history.slice(-HISTORY_MESSAGES), { role: "user", content: question }];
    const controller = new AbortController();
    setStreaming(controller);
    let answer = "";
    let finishReason = null;
    let failed = false;
    const fail = (message) => {
      failed = true;
      showMessage(view.error, message);
    };
    try {
      const response = await postJson("/v1/chat/completions", { model, messages, stream: true }, controller.signal);
      view.root.dataset.state = "streaming";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let done = false;
      while (!done) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        buffer += value;
        const lines = buffer.split(/\r?\n/);
        buffer = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") {
            done = true;
            break;
          }
          let chunk;
          try {
            chunk = JSON.parse(payload);
          } catch (_) {
            continue;
          }
          if (chunk.error) {
            fail(chunk.error.message || "the expert failed while answering");
            continue;
          }
          const routing = { ...(view.routing || {}), ...stripUndefined(routingOf(chunk)) };
          if (JSON.stringify(routing) !== JSON.stringify(view.routing)) {
            view.routing = routing;
            renderWho(view, routing);
          }
          const choice = (chunk.choices || [])[0];
          const piece = choice && choice.delta && choice.delta.content;
          if (piece) {
            const following = atBottom();
            answer += piece;
            view.text.textContent = answer;
            if (following) window.scrollTo(0, document.documentElement.scrollHeight);
          }
          if (choice && choice.finish_reason) finishReason = choice.finish_reason;
        }
      }
      if (!done && !failed) fail(cutOff(view.routing));
    } catch (exc) {
      if (exc.name === "AbortError") {
        view.root.dataset.state = "stopped";
        view.text.append(el("span", { class: "muted", text: answer ? " (stopped)" : "(stopped)" }));
      } else {
        fail(view.routing ? cutOff(view.routing) : exc.message);
      }
    } finally {
      setStreaming(null);
      view.text.classList.remove("pending");
    }
    if (!view.routing) view.who.replaceChildren(el("span", { class: "muted", text: "no expert answered" }));
    if (!answer && !failed && view.root.dataset.state !== "stopped") view.text.textContent = "(empty answer)";
    if (!answer) view.text.hidden = failed;
    if (finishReason === "length") view.text.append(el("span", { class: "muted", text: " … (cut off at the length limit)" }));
    if (view.root.dataset.state !== "stopped") view.root.dataset.state = failed ? "error" : "done";
    renderThumbs(view, view.routing);
    if (answer && !failed) state.history.push({ role: "user", content: question }, { role: "assistant", content: answer });
    view.root.scrollIntoView({ block: "end", behavior: "smooth" });
  }

  function atBottom() {
    const page = document.documentElement;
    return page.scrollHeight - (window.scrollY + window.innerHeight) < 80;
  }

  // A stream that ends without [DONE]: the node (or llama.cpp inside it) may have crashed; name the expert.
function cutOff(routing) {
  const expert = routing && routing.expert ? `expert ${routing.expert}` : "the expert";
  return `The answer from ${expert} was cut off: the connection closed before the end (the node may have crashed; see its log or run expertmesh doctor).`;
}

function stripUndefined(obj) {
    return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined && v !== null));
  }

  function setupChat() {
    const form = $("ask");
    const prompt = $("prompt");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (state.streaming) return;
      const question = prompt.value.trim();
      if (!question) {
        prompt.focus();
        return;
      }
      showAskError("");
      prompt.value = "";
      ask(question, $("model").value || "auto");
    });
    $("send").addEventListener("click", (event) => {
      if (!state.streaming) return;
      event.preventDefault(); // while streaming the button stops the answer
      state.streaming.abort();
    });
    prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.ctrlKey && !event.altKey && !event.metaKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    $("new-chat").addEventListener("click", () => {
      if (state.streaming) state.streaming.abort();
      state.history = [];
      $("conversation").replaceChildren($("chat-hint"));
      $("chat-hint").hidden = false;
      showAskError("");
      prompt.focus();
    });
  }

  // ---- charts (hand-made SVG) -----------------------------------------------------------------

  const CHAR_PX = 6.3; // rough width of one 11px character, to keep labels inside their column

  function fitText(text, widthPx) {
    const max = Math.max(3, Math.floor(widthPx / CHAR_PX));
    return text.length <= max ? text : text.slice(0, max - 1) + "…";
  }

  function label(x, y, text, attrs = {}, widthPx = null) {
    const shown = widthPx ? fitText(String(text), widthPx) : String(text);
    const node = svg("text", { x, y, ...attrs }, shown);
    if (shown !== String(text)) node.append(svg("title", {}, String(text)));
    return node;
  }

  function chartWidth(container) {
    return Math.max(260, Math.floor(container.clientWidth || 560));
  }

  function colorMap(keys) {
    const map = new Map();
    keys.forEach((key, i) => map.set(key, PALETTE[i % PALETTE.length]));
    return map;
  }

  function legend(entries) {
    return el("div", { class: "legend" }, ...entries.map(([text, color, title]) => {
      const swatch = el("i");
      swatch.style.background = color;
      return el("span", { title: title || text }, swatch, text);
    }));
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  // Scores per dimension, one bar per judge with its confidence interval as a whisker.
  function scoreChart(container, cards, expertNode) {
    const width = chartWidth(container);
    const dims = [...new Set(cards.flatMap((c) => Object.keys(c.scores || {})))].sort();
    if (!dims.length) return el("p", { class: "muted small", text: "No scores in its cards yet." });
    const values = cards.flatMap((c) => Object.values(c.scores || {}).flatMap((s) => [s.mean, s.ci_high]));
    const top = Math.max(1, ...values.filter((v) => typeof v === "number"));
    const scaleMax = top > 1 ? niceMax(top) : 1;
    const labelW = Math.min(110, Math.round(width * 0.3));
    const valueW = 36;
    const plotW = width - labelW - valueW - 8;
    const barH = cards.length > 2 ? 7 : 10;
    const rowH = Math.max(20, cards.length * (barH + 3) + 8);
    const axisH = 16;
    const height = dims.length * rowH + axisH;
    const x = (v) => labelW + (Math.max(0, Math.min(scaleMax, v)) / scaleMax) * plotW;
    const colors = colorMap(cards.map((c) => c.judge));
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
      "aria-label": `Judged scores by dimension: ${dims.join(", ")}` });
    for (const tick of [0, 0.5, 1]) {
      root.append(svg("line", { class: "gridline", x1: x(tick * scaleMax), x2: x(tick * scaleMax), y1: 0, y2: height - axisH }));
      root.append(label(x(tick * scaleMax), height - 3, fmt(tick * scaleMax, scaleMax > 1 ? 0 : 1), { "text-anchor": "middle" }));
    }
    dims.forEach((dim, row) => {
      const y0 = row * rowH;
      root.append(label(0, y0 + rowH / 2 + 4, dim.replace(/_/g, " "), { class: "strong" }, labelW - 6));
      const means = [];
      cards.forEach((card, i) => {
        const s = (card.scores || {})[dim];
        const y = y0 + 4 + i * (barH + 3);
        root.append(svg("rect", { class: "track", x: labelW, y, width: plotW, height: barH, rx: 2 }));
        if (!s || typeof s.mean !== "number") return;
        means.push(s.mean);
        const title = `${dim}, judged by ${card.judge}: ${fmt(s.mean)} (95% CI ${fmt(s.ci_low)}–${fmt(s.ci_high)}, n=${s.n ?? "?"})`;
        root.append(svg("rect", { x: labelW, y, width: Math.max(1, x(s.mean) - labelW), height: barH, rx: 2, fill: colors.get(card.judge) },
          svg("title", {}, title)));
        if (typeof s.ci_low === "number" && typeof s.ci_high === "number") {
          const yc = y + barH / 2;
          root.append(svg("path", { class: "whisker", d: `M${x(s.ci_low)} ${yc}H${x(s.ci_high)}M${x(s.ci_low)} ${yc - 3}v6M${x(s.ci_high)} ${yc - 3}v6` }));
        }
      });
      if (means.length) {
        const avg = means.reduce((a, b) => a + b, 0) / means.length;
        root.append(label(width - 2, y0 + rowH / 2 + 4, fmt(avg), { "text-anchor": "end", class: "strong" }));
      }
    });
    const box = el("div", {}, root);
    box.append(legend(cards.map((c) => {
      const who = c.judge === state.nodeId ? "this node" : c.judge === expertNode ? "its own node" : "node " + shortNode(c.judge);
      const when = c.issued_ms ? ", " + ago(c.issued_ms) : "";
      return ["judged by " + who + when, colors.get(c.judge), c.judge];
    })));
    return box;
  }

  // Horizontal bars: [label, value] rows, each with its own color.
  function barChart(container, rows, colors, total) {
    const width = chartWidth(container);
    const labelW = Math.min(170, Math.round(width * 0.38));
    const valueW = 78;
    const plotW = width - labelW - valueW;
    const rowH = 26;
    const height = rows.length * rowH;
    const top = Math.max(...rows.map(([, v]) => v), 1);
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
      "aria-label": rows.map(([k, v]) => `${k}: ${v}`).join("; ") });
    rows.forEach(([key, value], i) => {
      const y = i * rowH;
      root.append(label(0, y + 17, expertName(key), { class: "strong" }, labelW - 6));
      root.append(svg("rect", { class: "track", x: labelW, y: y + 6, width: plotW, height: 14, rx: 3 }));
      root.append(svg("rect", { x: labelW, y: y + 6, width: Math.max(1, (value / top) * plotW), height: 14, rx: 3, fill: colors.get(key) },
        svg("title", {}, `${key}: ${value}`)));
      root.append(label(width - 2, y + 17, `${value} · ${pct(total ? value / total : 0)}`, { "text-anchor": "end" }));
    });
    return root;
  }

  // One 100% bar per task, split by the experts it went to.
  function stackedChart(container, byTask, colors, order) {
    const width = chartWidth(container);
    const tasks = Object.keys(byTask).sort();
    const labelW = Math.min(110, Math.round(width * 0.28));
    const valueW = 50;
    const plotW = width - labelW - valueW;
    const rowH = 28;
    const height = tasks.length * rowH;
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
      "aria-label": "Share of each expert per kind of question" });
    tasks.forEach((task, i) => {
      const row = byTask[task] || {};
      const counts = order.filter((expert) => row[expert] > 0).map((expert) => [expert, row[expert]]);
      const total = counts.reduce((sum, [, n]) => sum + n, 0);
      const y = i * rowH;
      root.append(label(0, y + 18, task, { class: "strong" }, labelW - 6));
      root.append(svg("rect", { class: "track", x: labelW, y: y + 6, width: plotW, height: 16, rx: 3 }));
      let x = labelW;
      for (const [expert, n] of counts) {
        const w = total ? (n / total) * plotW : 0;
        root.append(svg("rect", { x, y: y + 6, width: Math.max(0, w - 1), height: 16, fill: colors.get(expert) },
          svg("title", {}, `${task} → ${expert}: ${n} of ${total} (${pct(n / total)})`)));
        x += w;
      }
      root.append(label(width - 2, y + 18, "n=" + total, { "text-anchor": "end" }));
    });
    return root;
  }

  // Reward over time: a line through the rated points, dots sized by how many ratings each holds.
  function lineChart(container, points) {
    const width = chartWidth(container);
    const height = 200;
    const pad = { left: 34, right: 12, top: 10, bottom: 24 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const ts = points.map((p) => p.t_ms);
    const rewards = points.map((p) => p.reward);
    const t0 = Math.min(...ts);
    const t1 = Math.max(...ts);
    const lo = Math.min(0, ...rewards);
    const hi = Math.max(1, ...rewards);
    const x = (t) => pad.left + (t1 > t0 ? ((t - t0) / (t1 - t0)) * plotW : plotW / 2);
    const y = (r) => pad.top + (1 - (r - lo) / (hi - lo)) * plotH;
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
      "aria-label": `Reward over time, ${points.length} points, latest ${fmt(rewards[rewards.length - 1])}` });
    for (let i = 0; i <= 4; i++) {
      const r = lo + ((hi - lo) * i) / 4;
      root.append(svg("line", { class: "gridline", x1: pad.left, x2: width - pad.right, y1: y(r), y2: y(r) }));
      root.append(label(pad.left - 6, y(r) + 4, fmt(r, hi - lo > 2 ? 0 : 2), { "text-anchor": "end" }));
    }
    root.append(svg("line", { class: "axis", x1: pad.left, x2: width - pad.right, y1: y(lo), y2: y(lo) }));
    const ticks = t1 > t0 ? [t0, (t0 + t1) / 2, t1] : [t0];
    ticks.forEach((t, i) => {
      const anchor = ticks.length === 1 ? "middle" : ["start", "middle", "end"][i];
      root.append(label(x(t), height - 6, clockTime(t), { "text-anchor": anchor }));
    });
    if (points.length > 1) {
      const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.t_ms).toFixed(1)} ${y(p.reward).toFixed(1)}`).join("");
      root.append(svg("path", { class: "area", d: `${d}L${x(t1).toFixed(1)} ${y(lo)}L${x(t0).toFixed(1)} ${y(lo)}Z` }));
      root.append(svg("path", { class: "line", d }));
    }
    const nMax = Math.max(1, ...points.map((p) => p.n || 1));
    for (const p of points) {
      const r = 2.5 + 2.5 * Math.sqrt((p.n || 1) / nMax);
      root.append(svg("circle", { class: "dot", cx: x(p.t_ms), cy: y(p.reward), r },
        svg("title", {}, `${new Date(p.t_ms).toLocaleString()}: reward ${fmt(p.reward)} over ${p.n ?? "?"} ratings`)));
    }
    return root;
  }

  // ---- network ------------------------------------------------------------------------------

  const lastData = { experts: null, stats: null };

  async function refreshNetwork() {
    await Promise.all([refreshPeers(), refreshExperts()]);
    $("network-updated").textContent = "Updated " + new Date().toLocaleTimeString() + "; refreshes every few seconds.";
  }

  $("join-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = $("join-status");
    const invite = $("join-invite").value.trim();
    if (!invite) return;
    try {
      const body = await (await postJson("/v1/join", { invite })).json();
      showMessage(status, `Joined node ${body.joined}` + (body.relayed ? "; it relays for this node." : "."));
      $("join-invite").value = "";
      refreshPeers();
    } catch (exc) {
      showMessage(status, `Could not join: ${exc.message}`);
    }
  });

  function reachText(reach) {
    if (!reach || reach.kind === "direct") return "direct";
    return reach.kind + " via " + (reach.via || reach.via_url);
  }

  async function refreshPeers() {
    try {
      const body = await getJson("/v1/peers");
      showMessage($("peers-error"), "");
      const peers = body.data || [];
      const alive = peers.filter((p) => p.alive).length;
      $("peers-summary").textContent = `This node is ${body.node_id}. It knows ${peers.length} peer${peers.length === 1 ? "" : "s"}, ${alive} alive.`;
      const rows = peers.map((p) =>
        el("tr", {},
          el("td", { class: "mono", text: p.id }),
          el("td", {}, el("span", { class: "badge " + (p.alive ? "alive" : "dead"), text: p.alive ? "alive" : "unreachable" })),
          el("td", { title: (p.reach && p.reach.via_url) || "", text: reachText(p.reach) }),
          el("td", { text: typeof p.rtt_ms === "number" ? fmt(p.rtt_ms, 1) + " ms" : "–" }),
          el("td", { title: p.last_seen_ms ? new Date(p.last_seen_ms).toLocaleString() : "", text: ago(p.last_seen_ms) }),
          el("td", { text: p.source || "–" }),
          el("td", { text: (p.experts || []).map(expertName).join(", ") || "–", title: (p.experts || []).join("\n") }),
          el("td", { class: "mono", text: p.url || "–" })));
      document.querySelector("#peers tbody").replaceChildren(...rows);
      document.querySelector("#peers").closest(".table-wrap").hidden = !rows.length;
      showMessage($("peers-empty"), rows.length ? "" :
        `No peers yet. Nodes on the same LAN find each other by themselves; elsewhere, start a node with --peer ${location.origin}.`);
    } catch (exc) {
      showMessage($("peers-error"), `Could not load peers: ${exc.message}`);
    }
  }

  async function refreshExperts() {
    try {
      lastData.experts = await getJson("/v1/experts");
      showMessage($("experts-error"), "");
      showMessage($("experts-empty"), "");
    } catch (exc) {
      lastData.experts = null;
      $("experts").replaceChildren();
      if (exc.status === 404) {
        showMessage($("experts-error"), "");
        showMessage($("experts-empty"), "Expert profiles are not available on this node.");
      } else {
        showMessage($("experts-error"), `Could not load experts: ${exc.message}`);
      }
      return;
    }
    drawExperts();
  }

  function drawExperts() {
    const body = lastData.experts;
    if (!body || state.tab !== "network") return;
    const experts = body.data || [];
    const container = $("experts");
    if (!experts.length) {
      container.replaceChildren();
      showMessage($("experts-empty"), "No experts known yet.");
      return;
    }
    const cards = experts.map((expert) => {
      const card = el("article", { class: "card", data: { expert: expert.id } });
      container.append(card); // in the page first, so charts can measure their width
      const depth = Number(expert.queue_depth) || 0;
      const capacity = Number(expert.capacity) || 4;
      const flags = Array.isArray(expert.flags) ? expert.flags : [];
      card.append(
        el("h3", {}, expertLabel(expert.id)),
        el("div", { class: "sub" },
          el("span", { class: "mono", title: expert.node || "", text: expert.node === state.nodeId ? "this node" : "node " + shortNode(expert.node) }),
          el("span", { class: "badge", text: expert.local ? "local" : "remote" }),
          flags.length ? el("span", { class: "badge warn", text: `${flags.length} flag${flags.length === 1 ? "" : "s"}` }) : null),
        el("div", { class: "load", title: "requests running or waiting on this expert now" },
          el("span", { text: "Load" }), meter(depth / Math.max(capacity, depth, 1)),
          el("span", { text: depth ? `${depth} in queue` : "idle" })));
      const judged = Array.isArray(expert.cards) ? expert.cards : [];
      const chartBox = el("div");
      card.append(chartBox);
      chartBox.append(judged.length ? scoreChart(chartBox, judged, expert.node) : el("p", { class: "muted small", text: "Not judged yet." }));
      if (flags.length) card.append(el("ul", { class: "flags" }, ...flags.map((f) => el("li", { text: flagText(f) }))));
      return card;
    });
    container.replaceChildren(...cards);
  }

  function flagText(flag) {
    if (typeof flag === "string") return flag;
    if (flag && typeof flag === "object") {
      const head = flag.kind || flag.type || flag.reason || "flag";
      const detail = flag.message || flag.detail || flag.evidence;
      const by = flag.by || flag.judge;
      return [head, detail && (typeof detail === "string" ? detail : JSON.stringify(detail)), by && "reported by " + shortNode(by)]
        .filter(Boolean).join(" — ");
    }
    return String(flag);
  }

  // ---- learning -----------------------------------------------------------------------------

  async function refreshLearning() {
    try {
      lastData.stats = await getJson("/v1/router/stats");
      showMessage($("learning-error"), "");
    } catch (exc) {
      lastData.stats = null;
      if (exc.status === 404) {
        showMessage($("learning-error"), "");
        showMessage($("learning-empty"), "No routing data yet. Ask with the expert set to auto and rate the answers; this view then shows what the router learns.");
        $("learning").hidden = true;
      } else {
        showMessage($("learning-error"), `Could not load routing statistics: ${exc.message}`);
      }
      return;
    }
    drawLearning();
    $("learning-updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
  }

  function drawLearning() {
    const stats = lastData.stats;
    if (!stats || state.tab !== "learning") return;
    const points = (stats.reward_over_time || []).filter((p) => typeof p.t_ms === "number" && typeof p.reward === "number")
      .sort((a, b) => a.t_ms - b.t_ms);
    const share = stats.share_by_expert || {};
    const byTask = stats.share_by_task || {};
    const empty = !points.length && !Object.keys(share).length && !Object.keys(byTask).length;
    showMessage($("learning-empty"), empty ? "No routing data yet. Ask with the expert set to auto and rate the answers." : "");
    $("learning").hidden = empty;
    if (empty) return;

    // One color per expert across both share charts, most chosen first.
    const totals = new Map(Object.entries(share));
    for (const counts of Object.values(byTask)) {
      for (const [expert, n] of Object.entries(counts || {})) if (!totals.has(expert)) totals.set(expert, n);
    }
    const experts = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || a.localeCompare(b));
    const colors = colorMap(experts);

    const reward = $("chart-reward");
    reward.replaceChildren(points.length
      ? lineChart(reward, points)
      : el("p", { class: "muted", text: "No rated answers yet: rate answers in the chat." }));

    const shareBox = $("chart-share");
    const rows = Object.entries(share).sort((a, b) => b[1] - a[1]);
    const total = rows.reduce((sum, [, n]) => sum + n, 0);
    shareBox.replaceChildren(rows.length ? barChart(shareBox, rows, colors, total) : el("p", { class: "muted", text: "No routed answers yet." }));

    const tasksBox = $("chart-tasks");
    if (Object.keys(byTask).length) {
      tasksBox.replaceChildren(stackedChart(tasksBox, byTask, colors, experts),
        legend(experts.map((e) => [expertName(e), colors.get(e), e])));
    } else {
      tasksBox.replaceChildren(el("p", { class: "muted", text: "No routed answers yet." }));
    }
  }

  function redrawCharts() {
    if (state.tab === "network") drawExperts();
    if (state.tab === "learning") drawLearning();
  }

  // ---- start --------------------------------------------------------------------------------

  setupTabs();
  setupChat();
  loadNode().then(() => showTab(location.hash.slice(1) || "chat"));
  $("prompt").focus();
})();
