// Fusion playground: chats through the server's own /v1/chat/completions with
// fusion.trace on, colours each streamed segment by the source model that won it, and
// shows every candidate with each model's perplexity. Plain browser JS, no build step.
"use strict";

const PALETTE = ["#1f77b4", "#e8590c", "#2f9e44", "#ae3ec9", "#c92a2a", "#0c8599", "#8c6d1f"];
const FUSION_COLOUR = "#868e96"; // Cool+R: the fused answer itself won the rerank
const KEY_STORE = "fusion-playground-api-key";

const $ = (sel) => document.querySelector(sel);
const shortName = (name) => name.split("-")[0];
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

const state = {
  fused: null,        // the fused model's id
  sources: [],        // source model ids, in server order
  colours: {},        // source -> colour
  history: [],        // [{role, content}] of this chat
  wins: {},           // source -> segments won in this chat
  running: [],        // AbortControllers of the answers being written
};

// -- HTTP ---------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

function setStatus(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

// -- models and settings ------------------------------------------------------------
async function loadModels() {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    setStatus(`cannot reach the server: ${e.message}`, true);
    return false;
  }
  if (resp.status === 401) {
    setStatus("this server needs an API key: type it in the key field (kept in this browser only)", true);
    $("#api-key").focus();
    return false;
  }
  if (!resp.ok) {
    setStatus(`models: ${await errorText(resp)}`, true);
    return false;
  }
  const cards = (await resp.json()).data;
  const fused = cards.find((c) => c.fusion);
  if (!fused) {
    setStatus("no fused model on this server", true);
    return false;
  }
  state.fused = fused.id;
  state.sources = fused.fusion.sources;
  state.sources.forEach((s, i) => { state.colours[s] = PALETTE[i % PALETTE.length]; });
  $("#method").value = fused.fusion.method || "cool";
  const rule = $("#rule").querySelector("option[value='']");
  rule.textContent = `server default (${fused.fusion.selection || "mean_ppl"})`;
  renderSources();
  renderLegend();
  setStatus(`ready: "${state.fused}" fuses ${state.sources.join(", ")}`);
  refreshStats();
  return true;
}

function renderSources() {
  const box = $("#sources");
  box.querySelectorAll("label").forEach((n) => n.remove());
  const compare = $("#compare");
  compare.querySelectorAll("option:not([value=''])").forEach((n) => n.remove());
  const leader = $("#leader");
  leader.querySelectorAll("option:not([value=''])").forEach((n) => n.remove());
  for (const s of state.sources) leader.append(el("option", { value: s }, s));
  for (const s of state.sources) {
    const cb = el("input", { type: "checkbox", value: s, name: "source" });
    cb.checked = true;
    box.append(el("label", {}, cb, " ", el("span", { class: "swatch", style: `--c:${state.colours[s]};display:inline-block` }), " ", s));
    compare.append(el("option", { value: s }, `${s} alone`));
  }
}

function chosenSources() {
  return [...document.querySelectorAll("#sources input:checked")].map((n) => n.value);
}

function renderLegend() {
  const ul = $("#legend ul");
  ul.replaceChildren();
  const entries = [...state.sources.map((s) => [s, state.colours[s]]), ["fusion (Cool+R)", FUSION_COLOUR]];
  for (const [name, colour] of entries) {
    ul.append(el("li", { "data-model": name },
      el("span", { class: "swatch", style: `--c:${colour}` }), name,
      el("span", { class: "count" }, String(state.wins[name] || 0))));
  }
}

async function refreshStats() {
  try {
    const resp = await fetch("/v1/fusion/stats", { headers: headers() });
    if (!resp.ok) return;
    const stats = await resp.json();
    const body = $("#stats tbody");
    body.replaceChildren();
    const fmt = (v, f) => (v === null || v === undefined ? "—" : f(v));
    const ppl = (v) => (v < 100 ? v.toFixed(2) : v < 1e5 ? v.toFixed(0) : v.toExponential(1));
    for (const s of state.sources) {
      const x = stats.sources[s];
      const spread = x ? `median ${fmt(x.median_perplexity, ppl)}, geometric mean ${fmt(x.geomean_perplexity, ppl)}, mean ${fmt(x.mean_perplexity, ppl)}` : "";
      body.append(el("tr", { "data-model": s },
        el("td", { class: "name", title: s }, el("span", { class: "swatch", style: `--c:${state.colours[s]}` }), " ", shortName(s)),
        el("td", { class: "num" }, x ? `${(100 * x.share_won).toFixed(0)}%` : "—"),
        el("td", { class: "num", title: spread }, x ? fmt(x.median_perplexity, ppl) : "—"),
        el("td", { class: "num" }, x ? fmt(x.mean_step_ms, (v) => v.toFixed(0)) : "—")));
    }
    const policies = $("#policies");
    policies.replaceChildren(...Object.entries(stats.policies || {}).map(([name, c]) =>
      el("li", { title: "Cool steps: gated (the leader alone) / fused (scored by every model) / filtered (the filters left one candidate: not scored)" },
        `${name}: ${c.gated} gated, ${c.fused} fused, ${c.filtered || 0} filtered steps`)));
  } catch (_) { /* stats are a nicety; the chat works without them */ }
}

// -- streaming ----------------------------------------------------------------------
// Reads an SSE body and calls onData with each parsed JSON event until [DONE].
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue; // comments / keep-alive pings
      if (data === "[DONE]") return;
      onData(JSON.parse(data));
    }
  }
}

function answerBox(title, kind) {
  const text = el("div", { class: "text" });
  const meta = el("div", { class: "meta" });
  const box = el("div", { class: `answer ${kind}`, "data-state": "streaming" }, el("h3", {}, title), text, meta);
  return { box, text, meta };
}

async function streamAnswer(view, body, colourOf, countWins) {
  const ctrl = new AbortController();
  state.running.push(ctrl);
  const started = performance.now();
  let firstAt = null;
  let content = "";
  let segments = 0;
  let usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: ctrl.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (event) => {
      if (event.error) throw new Error(event.error.message || "the server reported an error");
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) return;
      const delta = (choice.delta && choice.delta.content) || "";
      const traced = choice.fusion && choice.fusion.segments;
      if (traced) {
        for (const seg of traced) {
          view.text.append(segmentSpan(seg, delta, colourOf));
          segments += 1;
          if (countWins) countWin(seg.winner);
        }
      } else if (delta) {
        view.text.append(delta);
      }
      if (delta && firstAt === null) firstAt = performance.now();
      content += delta;
    });
    const secs = (performance.now() - started) / 1000;
    const first = firstAt === null ? "" : `, first text after ${((firstAt - started) / 1000).toFixed(1)} s`;
    const toks = usage ? `${usage.completion_tokens} tokens, ` : "";
    view.meta.textContent = `${toks}${segments} segments, ${secs.toFixed(1)} s${first}`;
    view.box.dataset.state = "done";
  } catch (e) {
    view.box.dataset.state = e.name === "AbortError" ? "stopped" : "error";
    view.meta.textContent = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
  } finally {
    state.running = state.running.filter((c) => c !== ctrl);
  }
  return content;
}

function segmentSpan(seg, delta, colourOf) {
  const colour = colourOf(seg.winner);
  const gated = seg.step === "gated";
  const span = el("span", { class: gated ? "seg gated" : "seg", tabindex: "0", "data-winner": seg.winner, "data-step": seg.step || "fused", style: `--c:${colour}` }, delta);
  const best = seg.candidates.find((c) => c.proposers.includes(seg.winner)) || seg.candidates[0];
  const score = best && best.score !== null && best.score !== undefined ? best.score.toFixed(2) : "∞";
  span.title = gated
    ? `gated: ${seg.winner} was sure and wrote alone (perplexity ${score}); ${seg.step_ms} ms`
    : seg.step === "filtered"
      ? `filtered: ${seg.winner}'s segment was the only one the filters allowed, taken without scoring (${seg.candidates.length - 1} other candidate(s) excluded); ${seg.step_ms} ms`
      : `won by ${seg.winner} (${seg.rule || "mean_ppl"} score ${score}) over ${seg.candidates.length - 1} other candidate(s); ${seg.step_ms} ms`;
  span._trace = seg;
  const open = () => showDetails(span);
  span.addEventListener("click", open);
  span.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") open(); });
  return span;
}

function countWin(winner) {
  const name = state.sources.includes(winner) ? winner : "fusion (Cool+R)";
  state.wins[name] = (state.wins[name] || 0) + 1;
  renderLegend();
}

function fusedColour(winner) {
  return state.colours[winner] || FUSION_COLOUR;
}

function showDetails(span) {
  document.querySelectorAll(".seg.selected").forEach((n) => n.classList.remove("selected"));
  span.classList.add("selected");
  const seg = span._trace;
  // every model that scored any candidate (a filtered step shows each proposer's own)
  const scorers = [...new Set(seg.candidates.flatMap((c) => Object.keys(c.perplexities)))];
  const unscored = seg.step === "filtered";
  const fmt = (v) => (v === null || v === undefined ? (unscored ? "–" : "∞") : v < 1000 ? v.toFixed(3) : v.toExponential(1));
  const head = el("tr", {}, el("th", {}, "candidate"), el("th", {}, "proposed by"),
    ...scorers.map((m) => el("th", { class: "num", title: `perplexity under ${m}` }, shortName(m))),
    el("th", { class: "num", title: "arithmetic mean of the perplexities (the paper's score)" }, "mean"),
    el("th", { class: "num", title: `the ${seg.rule || "mean_ppl"} rule's score: lowest wins` }, "score"));
  const rows = seg.candidates.map((c) => el("tr", { class: (c.proposers.includes(seg.winner) ? "winner" : "") + (c.excluded ? " excluded" : "") },
    el("td", { class: "cand-text", title: c.excluded ? "excluded by a filter: the repetition guard, the leader's veto or consensus" : "" }, JSON.stringify(c.text) + (c.ended ? " ⏎end" : "")),
    el("td", { title: c.proposers.join(", ") }, c.proposers.map(shortName).join(", ")),
    ...scorers.map((m) => el("td", { class: "num" }, fmt(c.perplexities[m]))),
    el("td", { class: "num" }, fmt(c.mean_perplexity)),
    el("td", { class: "num" }, fmt(c.score))));
  const timings = seg.timings_ms
    ? Object.entries(seg.timings_ms).map(([k, v]) => `${k} ${v} ms`).join(", ") : "";
  const perModel = seg.model_ms
    ? Object.entries(seg.model_ms).map(([k, v]) => `${k} ${v} ms`).join(", ") : "";
  $("#details").replaceChildren(
    el("p", {}, `Segment ${seg.index + 1}: won by `, el("strong", {}, seg.winner),
      seg.step === "gated"
        ? " (gated: the leader was sure of every token, so nobody else proposed)."
        : unscored
          ? " (filtered: the filters left this candidate alone, so no model scored; each shows its proposers' own perplexity)."
          : ` (fused: lowest ${seg.rule || "mean_ppl"} score of ${seg.candidates.length} candidate(s)).`),
    el("table", { id: "candidates" }, el("thead", {}, head), el("tbody", {}, ...rows)),
    el("p", { class: "hint" }, `Step ${seg.step_ms} ms: ${timings}.`),
    el("p", { class: "hint" }, `Each model's own time: ${perModel}. Context: ${seg.context_tokens} tokens.`));
}

// -- chat ---------------------------------------------------------------------------
async function ask(event) {
  event.preventDefault();
  const prompt = $("#prompt").value.trim();
  if (!prompt || state.running.length) return;
  if (!state.fused && !(await loadModels())) return;
  const models = chosenSources();
  if (!models.length) {
    setStatus("choose at least one source model", true);
    return;
  }
  const maxTokens = Math.max(1, parseInt($("#max-tokens").value, 10) || 160);
  const method = $("#method").value;
  const compareWith = $("#compare").value;
  const messages = [...state.history, { role: "user", content: prompt }];
  $("#prompt").value = "";

  const ruleName = $("#rule").value || "default selection";
  const fusedTitle = models.length > 1 ? `${state.fused} · ${method} · ${ruleName} · ${models.join(" + ")}` : `${models[0]} (alone, via ${state.fused})`;
  const fusedView = answerBox(fusedTitle, "fused");
  const answers = el("div", { class: "answers" }, fusedView.box);
  const turn = el("div", { class: "turn" }, el("div", { class: "user" }, prompt), answers);
  $("#conversation").append(turn);
  turn.scrollIntoView({ block: "end" });

  const common = { messages, max_tokens: maxTokens, stream: true, stream_options: { include_usage: true } };
  const fusion = { method, models, trace: true };
  const selection = {};
  if ($("#rule").value) selection.rule = $("#rule").value;
  if ($("#leader").value) selection.leader = $("#leader").value;
  if (Object.keys(selection).length) fusion.selection = selection;
  const jobs = [streamAnswer(fusedView,
    { ...common, model: state.fused, fusion }, fusedColour, true)];
  if (compareWith) {
    const view = answerBox(`${compareWith} alone`, "single");
    answers.append(view.box);
    jobs.push(streamAnswer(view, { ...common, model: compareWith, fusion: { trace: true } }, () => state.colours[compareWith], false));
  }
  setRunning(true);
  setStatus("writing…");
  const [fusedText] = await Promise.all(jobs);
  setRunning(false);
  state.history = [...messages, { role: "assistant", content: fusedText }];
  setStatus(`ready: "${state.fused}" fuses ${state.sources.join(", ")}`);
  refreshStats();
}

function setRunning(on) {
  $("#send").disabled = on;
  $("#stop").disabled = !on;
}

function init() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    state.fused = null;
    loadModels();
  });
  $("#ask").addEventListener("submit", ask);
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#ask").requestSubmit(); }
  });
  $("#stop").addEventListener("click", () => state.running.forEach((c) => c.abort()));
  $("#new-chat").addEventListener("click", () => {
    state.history = [];
    state.wins = {};
    $("#conversation").replaceChildren();
    $("#details").replaceChildren();
    renderLegend();
  });
  loadModels();
}

init();
