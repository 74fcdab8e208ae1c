// loramux playground: one prompt, up to four mixes answering side by side.
// Plain JavaScript, no build step, no network but this server's public API (the routes any client uses):
// GET /v1/models, GET/POST/DELETE /v1/adapters, POST /v1/chat/completions (streamed), POST /v1/routing/tokens.
"use strict";

const MAX_COLUMNS = 4;
const ROUTING_MODES = ["arrow", "spectr"];
// Okabe-Ito colours (distinguishable with the common colour-vision deficiencies); the legend and each
// token's title / aria-label name the adapter too, so colour is never the only cue.
const PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"];

const state = { models: [], adapters: [], baseId: "loramux", columns: [] };

// --- the API -------------------------------------------------------------------------------------

function headers() {
  const key = document.getElementById("api-key").value.trim();
  const out = { "Content-Type": "application/json" };
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorOf(response) {
  // The server answers errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) {
    /* not JSON: fall through */
  }
  return `${response.status} ${response.statusText}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

// --- adapters ------------------------------------------------------------------------------------

async function refreshServer() {
  const [models, adapters] = await Promise.all([api("v1/models"), api("v1/adapters")]);
  state.models = models.data.map((m) => m.id);
  state.baseId = models.data.length ? models.data[0].id : "loramux";
  state.adapters = adapters.data;
  renderAdapters();
  state.columns.forEach(refreshColumnChoices);
  const line = `Model ${state.baseId}, ${state.adapters.length} adapter(s) loaded.`;
  document.getElementById("server-line").textContent = line;
  document.getElementById("server-line").classList.remove("is-error");
}

function renderAdapters() {
  const rows = document.getElementById("adapter-rows");
  rows.replaceChildren(...state.adapters.map(adapterRow));
  if (!state.adapters.length) rows.append(cellRow("No adapter loaded: load one below."));
}

function cellRow(text) {
  const tr = document.createElement("tr");
  const td = document.createElement("td");
  td.colSpan = 4;
  td.textContent = text;
  tr.append(td);
  return tr;
}

function adapterRow(adapter) {
  const tr = document.createElement("tr");
  tr.dataset.adapter = adapter.id;
  const name = element("th", adapter.id);
  name.scope = "row";
  name.title = `from ${adapter.source}`;
  tr.append(name, element("td", adapter.ranks.join(", ")), element("td", String(adapter.n_modules)));
  const button = document.createElement("button");
  button.type = "button";
  button.className = "unload";
  button.textContent = "Unload";
  button.setAttribute("aria-label", `Unload ${adapter.id}`);
  button.addEventListener("click", () => unloadAdapter(adapter.id));
  const td = document.createElement("td");
  td.append(button);
  tr.append(td);
  return tr;
}

function adapterMessage(text, isError) {
  const p = document.getElementById("adapter-message");
  p.textContent = text;
  p.classList.toggle("is-error", Boolean(isError));
}

async function loadAdapter(event) {
  event.preventDefault();
  const path = document.getElementById("load-path").value.trim();
  const name = document.getElementById("load-name").value.trim();
  const body = name ? { path, name } : { path };
  adapterMessage(`Loading ${path}…`);
  try {
    const info = await api("v1/adapters", { method: "POST", body: JSON.stringify(body) });
    adapterMessage(`Loaded ${info.id}.`);
    await refreshServer();
  } catch (e) {
    adapterMessage(`Could not load ${path}: ${e.message}`, true);
  }
}

async function unloadAdapter(name) {
  adapterMessage(`Unloading ${name}…`);
  try {
    await api(`v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
    adapterMessage(`Unloaded ${name}.`);
    await refreshServer();
  } catch (e) {
    adapterMessage(`Could not unload ${name}: ${e.message}`, true);
  }
}

// --- columns: their mixes ------------------------------------------------------------------------

function makeColumn(index) {
  const node = document.getElementById("column-template").content.firstElementChild.cloneNode(true);
  node.id = `column-${index}`;
  node.querySelector(".column-title").textContent = `Column ${index + 1}`;
  labelFor(node, ".kind-label", ".mix-kind", `mix-kind-${index}`);
  labelFor(node, ".mix-text-label", ".mix-text", `mix-text-${index}`);
  labelFor(node, ".save-name-label", ".save-name", `save-name-${index}`);
  labelFor(node, ".save-text-label", ".save-text", `save-text-${index}`);
  const column = { index, node, weights: {}, last: null };
  node.querySelector(".mix-kind").addEventListener("change", () => showKind(column));
  node.querySelector(".show-toml").addEventListener("click", () => showSaved(column, "toml"));
  node.querySelector(".show-curl").addEventListener("click", () => showSaved(column, "curl"));
  node.querySelector(".show-python").addEventListener("click", () => showSaved(column, "python"));
  node.querySelector(".copy").addEventListener("click", () => copySaved(column));
  return column;
}

function labelFor(node, labelSelector, inputSelector, id) {
  node.querySelector(inputSelector).id = id;
  node.querySelector(labelSelector).htmlFor = id;
}

function kindOptions() {
  // What a column may run under: weights set here, the base model, mix text, and every id /v1/models lists.
  const out = [
    ["sliders", "Weights (sliders)"],
    ["base", `Base model (${state.baseId})`],
    ["text", "Mix as text"],
  ];
  for (const id of state.models.slice(1)) out.push([`model:${id}`, describeModel(id)]);
  return out;
}

function describeModel(id) {
  if (id === "auto") return "auto (the router picks the mix)";
  if (ROUTING_MODES.includes(id)) return `${id} (every token routed)`;
  if (id.startsWith("pooled:")) return `${id} (routed once over the prompt)`;
  if (state.adapters.some((a) => a.id === id)) return `adapter ${id}`;
  return `named mix ${id}`;
}

function refreshColumnChoices(column) {
  const select = column.node.querySelector(".mix-kind");
  const kept = select.value;
  select.replaceChildren(
    ...kindOptions().map(([value, text]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = text;
      return option;
    }),
  );
  select.value = [...select.options].some((o) => o.value === kept) ? kept : "sliders";
  renderSliders(column);
  showKind(column);
}

function renderSliders(column) {
  const rows = column.node.querySelector(".slider-rows");
  rows.replaceChildren(...state.adapters.map((a) => sliderRow(column, a.id)));
}

function sliderRow(column, name) {
  const id = `w-${column.index}-${name}`;
  const row = document.createElement("div");
  row.className = "slider-row";
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = name;
  const input = Object.assign(document.createElement("input"), { type: "range", id, min: "-1", max: "2", step: "0.05" });
  input.value = String(column.weights[name] || 0);
  input.dataset.adapter = name;
  const output = document.createElement("output");
  output.htmlFor = id;
  output.textContent = Number(input.value).toFixed(2);
  input.addEventListener("input", () => {
    column.weights[name] = Number(input.value);
    output.textContent = Number(input.value).toFixed(2);
  });
  row.append(label, input, output);
  return row;
}

function showKind(column) {
  const kind = column.node.querySelector(".mix-kind").value;
  column.node.querySelector(".sliders").hidden = kind !== "sliders";
  column.node.querySelector(".mix-text-row").hidden = kind !== "text";
  column.node.querySelector(".kind-help").textContent = kindHelp(kind);
}

function kindHelp(kind) {
  if (kind === "sliders") return "Each adapter at the weight its slider gives (all at 0: the base model).";
  if (kind === "text") return 'Sent as the body\'s "mix" field, as written.';
  if (kind === "base") return "No adapter.";
  return `Sent as "model": "${kind.slice("model:".length)}".`;
}

function sliderMix(column) {
  const mix = {};
  for (const a of state.adapters) {
    const w = column.weights[a.id] || 0;
    if (w !== 0) mix[a.id] = w;
  }
  return mix;
}

// The request fields that name a column's mix ("model" and/or "mix"), as selection.py reads them.
function mixFields(column) {
  const kind = column.node.querySelector(".mix-kind").value;
  if (kind === "sliders") return { model: state.baseId, mix: sliderMix(column) };
  if (kind === "text") return { model: state.baseId, mix: column.node.querySelector(".mix-text").value.trim() };
  if (kind === "base") return { model: state.baseId };
  return { model: kind.slice("model:".length) };
}

function renderColumns() {
  const n = Math.min(MAX_COLUMNS, Number(document.getElementById("column-count").value) || 1);
  while (state.columns.length < n) {
    const column = makeColumn(state.columns.length);
    state.columns.push(column);
    refreshColumnChoices(column);
  }
  const holder = document.getElementById("columns");
  holder.replaceChildren(...state.columns.slice(0, n).map((c) => c.node));
  holder.dataset.count = String(n);
}

// --- answers: one prompt to every column at once ---------------------------------------------------

function sampling() {
  const out = { max_tokens: Number(document.getElementById("max-tokens").value) || 48 };
  const temperature = document.getElementById("temperature").value;
  const seed = document.getElementById("seed").value;
  if (temperature !== "") out.temperature = Number(temperature);
  if (seed !== "") out.seed = Number(seed);
  return out;
}

function requestBody(column) {
  const prompt = document.getElementById("prompt").value;
  return { ...mixFields(column), messages: [{ role: "user", content: prompt }], ...sampling() };
}

async function sendAll(event) {
  event.preventDefault();
  if (document.getElementById("send-button").disabled) return; // still answering the last prompt
  const columns = state.columns.slice(0, Number(document.getElementById("column-count").value));
  const status = document.getElementById("batch-status");
  status.textContent = `Sent to ${columns.length} column(s) at once: the engine decodes them together in one batch…`;
  const button = document.getElementById("send-button");
  button.disabled = true; // one batch at a time: the answers of two sends would mix in the columns
  const started = performance.now();
  try {
    const results = await Promise.all(columns.map((c) => runColumn(c)));
    status.textContent = batchSummary(results, (performance.now() - started) / 1000);
  } finally {
    button.disabled = false;
  }
}

function batchSummary(results, seconds) {
  const done = results.filter((r) => r && r.timings);
  const failed = results.length - results.filter(Boolean).length;
  const errors = failed ? ` ${plural(failed, "column")} answered with an error (shown in the column).` : "";
  if (!done.length) return `${plural(results.length, "request")} sent at once; no answer.${errors}`;
  const tokens = done.reduce((sum, r) => sum + r.timings.predicted_n, 0);
  const each = done.map((r) => `${r.timings.predicted_per_second.toFixed(1)}`).join(", ");
  return (
    `${plural(results.length, "request")} sent at once, decoded together in one batch by the engine: ` +
    `${plural(tokens, "token")} in ${seconds.toFixed(2)} s (${(tokens / seconds).toFixed(1)} tokens/s together; ` +
    `per column, from each answer's timings: ${each} tokens/s).${errors}`
  );
}

function resetColumn(column) {
  for (const sel of [".answer", ".error", ".used", ".scores", ".strip"]) column.node.querySelector(sel).replaceChildren();
  column.node.classList.add("is-running");
  column.last = null;
}

async function runColumn(column) {
  resetColumn(column);
  const body = requestBody(column);
  try {
    const result = await streamAnswer(body, (text) => column.node.querySelector(".answer").append(text));
    column.last = { body, ...result };
    renderUsed(column, result);
    if (result.routing) renderScores(column, result.routing);
    if (result.mix && result.mix.mode) await renderStrip(column, body, result.text);
    return result;
  } catch (e) {
    column.node.querySelector(".error").textContent = e.message;
    return null;
  } finally {
    column.node.classList.remove("is-running");
  }
}

// POST /v1/chat/completions with stream: true, read as server-sent events through fetch + ReadableStream.
async function streamAnswer(body, onText) {
  const wire = { ...body, stream: true, stream_options: { include_usage: true }, timings_per_token: true };
  const response = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(wire) });
  if (!response.ok) throw new Error(await errorOf(response));
  const result = { text: "", mix: null, mix_source: null, routing: null, timings: null };
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) readEvent(event, result, onText);
  }
  return result;
}

function readEvent(event, result, onText) {
  const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
  if (!data || data === "[DONE]") return;
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(chunk.error.message); // an error after the stream began is its last event
  if (chunk.mix !== undefined) result.mix = chunk.mix;
  if (chunk.mix_source !== undefined) result.mix_source = chunk.mix_source;
  if (chunk.routing !== undefined) result.routing = chunk.routing;
  if (chunk.timings) result.timings = chunk.timings;
  for (const choice of chunk.choices || []) {
    const piece = (choice.delta && choice.delta.content) || "";
    if (piece) {
      result.text += piece;
      onText(piece);
    }
  }
}

// --- under each answer ----------------------------------------------------------------------------

function mixText(mix) {
  if (!mix) return "?";
  if (mix.mode) return `${mix.mode} (k=${mix.k}${mix.temperature == null ? "" : `, T=${mix.temperature}`})`;
  const parts = Object.entries(mix).map(([name, w]) => `${name} ${Number(w).toFixed(2)}`);
  return parts.length ? parts.join(", ") : "base model (no adapter)";
}

function renderUsed(column, result) {
  const dl = column.node.querySelector(".used");
  const rows = [
    ["Mix used", mixText(result.mix)],
    ["Chosen by", result.mix_source || "?"],
  ];
  if (result.timings) {
    const t = result.timings;
    const speed = `${plural(t.predicted_n, "token")} at ${t.predicted_per_second.toFixed(1)} tokens/s`;
    const prompt = `${plural(t.prompt_n, "prompt token")} read, ${t.cache_n} cached`;
    rows.push(["Speed", `${speed}; first token after ${t.prompt_ms.toFixed(0)} ms (${prompt})`]);
  }
  dl.replaceChildren(...rows.flatMap(([k, v]) => [element("dt", k), element("dd", v)]));
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) node.className = className;
  return node;
}

function renderScores(column, routing) {
  const holder = column.node.querySelector(".scores");
  const table = document.createElement("table");
  table.className = "score-table";
  table.append(element("caption", `Router's scores (top: ${routing.top1 || "?"}${routing.fallback ? ", fell back" : ""})`));
  const head = document.createElement("tr");
  head.append(element("th", "Adapter"), element("th", "Score"), element("th", "Weight"));
  table.append(head);
  const scores = Object.entries(routing.scores || {});
  const top = Math.max(...scores.map(([, s]) => Math.abs(Number(s))), 1e-9);
  for (const [name, score] of scores) {
    const tr = document.createElement("tr");
    tr.dataset.adapter = name;
    const weight = routing.mix && routing.mix[name] !== undefined ? Number(routing.mix[name]).toFixed(2) : "–";
    tr.append(element("th", name), scoreCell(score, top), element("td", weight));
    table.append(tr);
  }
  holder.replaceChildren(table);
}

function scoreCell(score, top) {
  // The number, then a bar scaled to the highest score (the bar repeats the number: aria-hidden).
  const td = element("td", Number(score).toFixed(3), "score");
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.width = `${(Math.max(0, Number(score)) / top) * 2.5}rem`;
  bar.setAttribute("aria-hidden", "true");
  td.append(bar);
  return td;
}

// The token strip: POST /v1/routing/tokens teacher-forces prompt + answer under the column's routed mix.
// weights: the kinds of base weights the shares average over (null: all of them).
async function renderStrip(column, body, answer, weights = null) {
  const holder = column.node.querySelector(".strip");
  holder.replaceChildren(element("p", "Reading the routing record…"));
  holder.dataset.weights = "pending";
  const fields = { model: body.model, messages: body.messages, answer, weights };
  if (body.mix !== undefined) fields.mix = body.mix;
  try {
    const report = await api("v1/routing/tokens", { method: "POST", body: JSON.stringify(fields) });
    column.last.strip = report;
    holder.replaceChildren(...stripNodes(report, column));
    holder.dataset.weights = report.weights ? report.weights.join(",") : "all";
    const select = holder.querySelector(".strip-weights");
    select.addEventListener("change", () => renderStrip(column, body, answer, select.value ? [select.value] : null));
  } catch (e) {
    holder.replaceChildren(element("p", `No token strip: ${e.message}`, "is-error"));
  }
}

function stripNodes(report, column) {
  const colour = Object.fromEntries(report.adapters.map((a, i) => [a, PALETTE[i % PALETTE.length]]));
  const strip = document.createElement("p");
  strip.className = "token-strip";
  strip.setAttribute("role", "group");
  strip.setAttribute("aria-label", "The answer's tokens, each named with the adapter it chose");
  for (const token of report.tokens.filter((t) => t.part === "answer")) strip.append(tokenNode(token, colour));
  const heading = element("h3", "Adapter chosen per token");
  const note = element(
    "p",
    "The routing of the prompt and answer teacher-forced as one sequence (POST /v1/routing/tokens); " +
      "a token's adapter is the one with the largest share, averaged over the chosen weights.",
    "note",
  );
  return [heading, strip, legend(report, colour), weightsPicker(report, column), note];
}

function weightsPicker(report, column) {
  // Which base weights the shares average over: all, or one kind (adapters adapt different weights).
  const id = `strip-weights-${column.index}`;
  const row = document.createElement("div");
  row.className = "strip-weights-row";
  const label = element("label", "Shares over the weights");
  label.htmlFor = id;
  const select = Object.assign(document.createElement("select"), { id, className: "strip-weights" });
  for (const kind of ["", ...report.kinds]) {
    const option = element("option", kind || "all adapted weights");
    option.value = kind;
    select.append(option);
  }
  select.value = report.weights ? report.weights[0] : "";
  row.append(label, select);
  return row;
}

function tokenNode(token, colour) {
  const span = element("span", token.piece, "token");
  const shares = Object.entries(token.shares)
    .sort((a, b) => b[1] - a[1])
    .map(([name, s]) => `${name} ${(s * 100).toFixed(0)}%`)
    .join(", ");
  const label = `${JSON.stringify(token.piece)}: ${token.adapter || "no adapter"}${shares ? ` (${shares})` : ""}`;
  span.title = label;
  span.setAttribute("aria-label", label);
  span.tabIndex = 0;
  span.dataset.adapter = token.adapter || "";
  if (token.adapter) span.style.backgroundColor = colour[token.adapter];
  return span;
}

function legend(report, colour) {
  const used = new Set(report.tokens.filter((t) => t.part === "answer").map((t) => t.adapter));
  const list = document.createElement("ul");
  list.className = "legend";
  list.setAttribute("aria-label", "Legend");
  for (const name of report.adapters.filter((a) => used.has(a))) {
    const item = element("li", name);
    const swatch = element("span", "", "swatch");
    swatch.style.backgroundColor = colour[name];
    swatch.setAttribute("aria-hidden", "true");
    item.prepend(swatch);
    list.append(item);
  }
  return list;
}

// --- saving: a named mix of the config, curl, Python ---------------------------------------------

function tomlKey(name) {
  return /^[A-Za-z0-9_-]+$/.test(name) ? name : JSON.stringify(name);
}

function savedMix(column) {
  // The mix the last answer actually used when it was a fixed one; else the column's slider weights.
  const used = column.last && column.last.mix;
  if (used && used.mode) return null;
  return used || sliderMix(column);
}

function tomlText(column) {
  const mix = savedMix(column);
  if (mix === null) {
    return '# A per-token routing mode is not a named mix: name it in each request ("model": "arrow").';
  }
  const name = column.node.querySelector(".save-name").value.trim() || "my_mix";
  const entries = Object.entries(mix).map(([a, w]) => `${tomlKey(a)} = ${Number(w)}`);
  return `# in the file of loramux serve --config FILE; then "model": "${name}"\n[mixes]\n${tomlKey(name)} = { ${entries.join(", ")} }\n`;
}

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

function curlText(column) {
  const body = JSON.stringify(requestBody(column));
  const key = document.getElementById("api-key").value.trim();
  const auth = key ? ` \\\n  -H ${shellQuote(`Authorization: Bearer ${key}`)}` : "";
  const url = new URL("v1/chat/completions", window.location.href).href;
  return `curl -s ${shellQuote(url)} \\\n  -H 'Content-Type: application/json'${auth} \\\n  -d ${shellQuote(body)}\n`;
}

function pythonText(column) {
  const body = requestBody(column);
  const extra = body.mix !== undefined ? `\n    extra_body={"mix": ${JSON.stringify(body.mix)}},` : "";
  const seed = body.seed !== undefined ? `\n    seed=${body.seed},` : "";
  const temperature = body.temperature !== undefined ? `\n    temperature=${body.temperature},` : "";
  const base = new URL("v1", window.location.href).href;
  const key = document.getElementById("api-key").value.trim() || "unused";
  return [
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(base)}, api_key=${JSON.stringify(key)})`,
    "out = client.chat.completions.create(",
    `    model=${JSON.stringify(body.model)},`,
    `    messages=${JSON.stringify(body.messages)},`,
    `    max_tokens=${body.max_tokens},${temperature}${seed}${extra}`,
    ")",
    'print(out.choices[0].message.content, out.model_extra["mix"])',
    "",
  ].join("\n");
}

function showSaved(column, what) {
  const text = { toml: tomlText, curl: curlText, python: pythonText }[what](column);
  column.node.querySelector(".save-text").value = text;
  const link = column.node.querySelector(".download");
  link.hidden = what !== "toml";
  link.href = `data:application/toml;charset=utf-8,${encodeURIComponent(text)}`;
}

async function copySaved(column) {
  const area = column.node.querySelector(".save-text");
  try {
    await navigator.clipboard.writeText(area.value);
  } catch (e) {
    area.select(); // no clipboard permission (plain http): selected for Ctrl+C
  }
}

// --- start ---------------------------------------------------------------------------------------

async function start() {
  document.getElementById("load-form").addEventListener("submit", loadAdapter);
  document.getElementById("prompt-form").addEventListener("submit", sendAll);
  document.getElementById("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) document.getElementById("prompt-form").requestSubmit();
  });
  document.getElementById("column-count").addEventListener("change", renderColumns);
  document.getElementById("api-key").addEventListener("change", () => refreshServer().catch(showServerError));
  renderColumns();
  try {
    await refreshServer();
  } catch (e) {
    showServerError(e);
  }
  document.body.dataset.ready = "true";
}

function showServerError(e) {
  const line = document.getElementById("server-line");
  line.textContent = `Cannot read the server: ${e.message}`;
  line.classList.add("is-error");
}

document.addEventListener("DOMContentLoaded", start);
