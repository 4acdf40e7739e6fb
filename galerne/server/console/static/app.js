/* galerne console: chat, compare, data and fine-tuning over this server's API.
 *
 * Plain JavaScript, no library, no build step. Every call goes to the same origin's /v1
 * routes (relative URLs: the console also works behind a proxy under a path), with the
 * API key the user gave (kept in this tab's sessionStorage) and in OpenAI's dialect.
 * Text that comes from the model, a file or the server is always inserted as text
 * (textContent, createTextNode, new Option): never parsed as HTML.
 */
"use strict";

const KEY_STORAGE = "galerne.apiKey";
const POLL_MS = 1500;

// ------------------------------------------------------------------ small helpers

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text nodes, never HTML). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
  }
  return node;
}

function show(node, visible) { node.hidden = !visible; }

function setError(node, message) {
  node.textContent = message || "";
  show(node, Boolean(message));
}

function formatBytes(n) {
  if (n == null) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function formatTime(unix) {
  if (!unix) return "";
  return new Date(unix * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" });
}

function formatDuration(s) {
  if (s == null || !isFinite(s)) return "";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function numberOf(input) {
  const text = input.value.trim();
  if (text === "") return undefined;
  const n = Number(text);
  return Number.isFinite(n) ? n : undefined;
}

// ------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The message of an error body in either dialect (or FastAPI's `detail`). */
function errorMessage(body, status) {
  if (body && typeof body === "object") {
    const e = body.error;
    if (e && typeof e === "object" && e.message) return String(e.message);
    if (typeof e === "string") return e;
    if (body.message) return typeof body.message === "string" ? body.message : JSON.stringify(body.message);
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  }
  return `HTTP ${status}`;
}

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function headers(extra = {}) {
  const h = { "X-Galerne-Dialect": "openai", ...extra };
  const key = apiKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

/** fetch() a route; an error answer (JSON envelope or not) becomes an ApiError, a 401 opens the key dialog. */
async function request(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, headers: headers(), signal, cache: "no-store" };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server cannot be reached (${e.message})`);
  }
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch { /* not JSON */ }
    if (res.status === 401) askForKey(errorMessage(body, 401));
    throw new ApiError(res.status, errorMessage(body, res.status));
  }
  return res;
}

async function api(path, options) {
  const res = await request(path, options);
  return res.json();
}

// ------------------------------------------------------------------ the API key

function askForKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason
    ? `${reason}. The key is kept in this tab only, and sent to this server only.`
    : "The key is kept in this tab only, and sent to this server only.";
  $("key-input").value = apiKey();
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function initKey() {
  $("key-button").addEventListener("click", () => askForKey(""));
  $("key-close").addEventListener("click", () => $("key-dialog").close());
  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("key-input").value = "";
    $("key-dialog").close();
  });
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    $("key-dialog").close();
    refreshAll();
  });
}

// ------------------------------------------------------------------ tabs

const TABS = ["chat", "compare", "data", "finetune"];

function selectTab(name, { focus = false } = {}) {
  if (!TABS.includes(name)) name = "chat";
  for (const tab of TABS) {
    const button = $(`tab-${tab}`);
    const selected = tab === name;
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    show($(`panel-${tab}`), selected);
  }
  if (focus) $(`tab-${name}`).focus();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "data") refreshFiles();
  if (name === "finetune") { refreshFiles(); refreshJobs(); }
}

function initTabs() {
  for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
  $("tab-chat").parentElement.addEventListener("keydown", (ev) => {
    const i = TABS.indexOf(document.activeElement.dataset.tab);
    if (i < 0) return;
    let j = null;
    if (ev.key === "ArrowRight") j = (i + 1) % TABS.length;
    else if (ev.key === "ArrowLeft") j = (i - 1 + TABS.length) % TABS.length;
    else if (ev.key === "Home") j = 0;
    else if (ev.key === "End") j = TABS.length - 1;
    if (j === null) return;
    ev.preventDefault();
    selectTab(TABS[j], { focus: true });
  });
  window.addEventListener("hashchange", () => selectTab(location.hash.slice(1)));
}

// ------------------------------------------------------------------ models

let models = [];  // the cards of GET /v1/models that can be chatted with

async function refreshModels() {
  try {
    const list = await api("v1/models");
    models = list.data.filter((m) => !m.archived);
    const base = list.data.find((m) => m.type === "base");
    $("server-status").textContent = base ? `serving ${base.id}` : "connected";
    fillModelSelects();
  } catch (e) {
    $("server-status").textContent = e.status === 401 ? "API key needed" : `error: ${e.message}`;
  }
}

function modelOptions(select, { baseOnly = false } = {}) {
  const previous = select.value;
  select.replaceChildren();
  const bases = models.filter((m) => m.type === "base");
  const tuned = models.filter((m) => m.type !== "base");
  const group = (label, items) => {
    if (!items.length) return;
    const g = el("optgroup", { label });
    for (const m of items) g.append(new Option(m.id, m.id));
    select.append(g);
  };
  group("Base model", bases);
  if (!baseOnly) group("Adapters and fine-tuned models", tuned);
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
}

function fillModelSelects() {
  modelOptions($("chat-model"));
  updateAttach();
  modelOptions($("compare-model-a"));
  const b = $("compare-model-b");
  const hadB = b.value;
  modelOptions(b);
  if (!hadB && b.options.length > 1) b.selectedIndex = b.options.length - 1;  // another model than A, if any
  modelOptions($("ft-model"), { baseOnly: true });
}

// ------------------------------------------------------------------ streaming a chat completion

/**
 * POST a streamed chat completion and hand each piece to `on`: on.thinking(text), on.content(text),
 * on.toolCall(index, {id, name, arguments}), on.usage(usage), on.finish(reason), on.first().
 * Server-Sent Events are read from fetch's body (EventSource cannot POST nor send a header).
 * Resolves when the stream ends; rejects with an ApiError, or an AbortError when `signal` aborts.
 */
async function streamChat(body, signal, on) {
  const res = await request("v1/chat/completions", {
    method: "POST", signal,
    json: { ...body, stream: true, stream_options: { include_usage: true } },
  });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let first = true;
  const handle = (data) => {
    if (data === "[DONE]") return true;
    let chunk;
    try { chunk = JSON.parse(data); } catch { throw new ApiError(0, `unreadable event: ${data.slice(0, 200)}`); }
    if (chunk.error || chunk.object === "error") throw new ApiError(0, errorMessage(chunk, 500));
    if (chunk.usage) on.usage?.(chunk.usage);
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      let any = false;
      if (delta.reasoning_content) { on.thinking?.(delta.reasoning_content); any = true; }
      if (typeof delta.content === "string" && delta.content) { on.content?.(delta.content); any = true; }
      if (Array.isArray(delta.content)) {  // Mistral's shape: thinking and text chunks
        for (const part of delta.content) {
          if (part.type === "thinking") {
            for (const t of part.thinking || []) if (t.text) { on.thinking?.(t.text); any = true; }
          } else if (part.type === "text" && part.text) { on.content?.(part.text); any = true; }
        }
      }
      for (const call of delta.tool_calls || []) {
        on.toolCall?.(call.index ?? 0, { id: call.id, name: call.function?.name, arguments: call.function?.arguments });
        any = true;
      }
      if (any && first) { first = false; on.first?.(); }
      if (choice.finish_reason) on.finish?.(choice.finish_reason);
    }
    return false;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && handle(data)) { reader.cancel().catch(() => {}); return; }
    }
  }
}

/** A message bubble: who, folded thinking, text, tool calls, stats, error. Returns its parts. */
function answerBubble(model) {
  const thinkingText = el("pre");
  const thinking = el("details", { class: "thinking", hidden: true }, el("summary", { text: "Thinking" }), thinkingText);
  const text = el("div", { class: "text" });
  const tools = el("div", { class: "tools" });
  const stats = el("div", { class: "stats" });
  const error = el("div", { class: "error", role: "alert", hidden: true });
  const node = el("article", { class: "msg assistant", "aria-busy": "true" },
    el("div", { class: "who", text: model }), thinking, text, tools, stats, error);
  return { node, thinking, thinkingText, text, tools, stats, error };
}

/**
 * Stream one answer into `bubble`; resolves to {content, toolCalls, stopped}.
 * Shows token counts and the speed (completion tokens over the time since the first token).
 */
async function runAnswer(body, bubble, signal) {
  const started = performance.now();
  let firstAt = null;
  let content = "";
  let usage = null;
  let finish = null;
  let pieces = 0;
  const calls = [];
  const on = {
    first: () => { firstAt = performance.now(); },
    thinking: (t) => { show(bubble.thinking, true); bubble.thinkingText.textContent += t; pieces++; },
    content: (t) => { content += t; bubble.text.textContent = content; pieces++; },
    toolCall: (i, c) => {
      if (!calls[i]) {
        const name = el("span", { class: "name" });
        const args = el("pre");
        calls[i] = { id: c.id, name: "", arguments: "", nameNode: name, argsNode: args };
        bubble.tools.append(el("div", { class: "tool-call", "data-index": i }, el("span", { text: "Tool call: " }), name, args));
      }
      const call = calls[i];
      if (c.id) call.id = c.id;
      if (c.name) { call.name += c.name; call.nameNode.textContent = call.name; }
      if (c.arguments) { call.arguments += c.arguments; call.argsNode.textContent = prettyJson(call.arguments); }
      pieces++;
    },
    usage: (u) => { usage = u; },
    finish: (r) => { finish = r; },
  };
  let stopped = false;
  try {
    await streamChat(body, signal, on);
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else setError(bubble.error, e.message);
  } finally {
    bubble.node.classList.add("done");
    bubble.node.removeAttribute("aria-busy");
  }
  const end = performance.now();
  const parts = [];
  if (usage) {
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
    const reasoning = usage.completion_tokens_details?.reasoning_tokens;
    if (reasoning) parts.push(`${reasoning} thinking`);
    if (firstAt !== null && usage.completion_tokens > 1 && end > firstAt) {
      parts.push(`${((usage.completion_tokens - 1) / ((end - firstAt) / 1000)).toFixed(1)} tokens/s`);
    }
  } else if (pieces) {
    parts.push(`about ${pieces} tokens`);
  }
  if (firstAt !== null) parts.push(`first token after ${((firstAt - started) / 1000).toFixed(2)} s`);
  if (stopped) parts.push("stopped");
  else if (finish) parts.push(`finish: ${finish}`);
  bubble.stats.textContent = parts.join(" · ");
  bubble.node.dataset.finish = stopped ? "stopped" : (finish || "error");
  return { content, toolCalls: calls.filter(Boolean), stopped };
}

function prettyJson(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return text; }
}

function sampling(prefix) {
  const out = {};
  const t = numberOf($(`${prefix}-temperature`));
  if (t !== undefined) out.temperature = t;
  const topP = $(`${prefix}-top-p`) ? numberOf($(`${prefix}-top-p`)) : undefined;
  if (topP !== undefined) out.top_p = topP;
  const max = numberOf($(`${prefix}-max-tokens`));
  if (max !== undefined) out.max_tokens = Math.round(max);
  return out;
}

/** Enter sends the form (Shift+Enter: a new line; not while an IME composes). */
function enterSends(textarea, form) {
  textarea.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
}

// ------------------------------------------------------------------ chat

const chat = { history: [], controller: null, images: [] };  // images: {name, url} to send with the next message

// Whether the model picked in ``select`` takes images (its card's capabilities).
function seesImages(select) {
  const card = models.find((m) => m.id === select.value);
  return Boolean(card && card.capabilities && card.capabilities.vision);
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function renderAttachments() {
  const box = $("chat-attachments");
  box.replaceChildren(...chat.images.map((image, i) => el("span", { class: "chip" },
    el("span", { text: `image: ${image.name}` }),
    el("button", { type: "button", class: "link", "aria-label": `Remove ${image.name}`, text: "\u00d7",
                   onclick: () => { chat.images.splice(i, 1); renderAttachments(); } }))));
  show(box, chat.images.length > 0);
}

function updateAttach() {
  const sees = seesImages($("chat-model"));
  show($("chat-attach"), sees);
  if (!sees && chat.images.length) { chat.images = []; renderAttachments(); }
}

function chatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

function initChat() {
  // On a phone the settings start folded: the conversation gets the screen.
  if (window.matchMedia("(max-width: 820px)").matches) $("chat-settings-fold").open = false;
  const form = $("chat-form");
  const input = $("chat-input");
  enterSends(input, form);
  $("chat-model").addEventListener("change", updateAttach);
  $("chat-attach").addEventListener("click", () => $("chat-image").click());
  $("chat-image").addEventListener("change", async () => {
    const picker = $("chat-image");
    for (const file of picker.files) {
      try { chat.images.push({ name: file.name, url: await readAsDataURL(file) }); }
      catch (e) { alertInLog(`${file.name}: cannot read it (${e.message})`); }
    }
    picker.value = "";
    renderAttachments();
    input.focus();
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (chat.controller) return;
    const text = input.value;
    if (!text.trim()) return;
    const model = $("chat-model").value;
    if (!model) { askForKeyOrReload(); return; }
    let tools;
    const toolsText = $("chat-tools").value.trim();
    if (toolsText) {
      try { tools = JSON.parse(toolsText); } catch (e) { alertInLog(`Tools: not JSON (${e.message})`); return; }
    }
    show($("chat-empty"), false);
    input.value = "";
    const images = chat.images;
    chat.images = [];
    renderAttachments();
    const log = $("chat-log");
    log.append(el("article", { class: "msg user" }, el("div", { class: "who", text: "you" }), el("div", { class: "text", text }),
      ...images.map((image) => el("div", { class: "muted attached", text: `image: ${image.name}` }))));
    const bubble = answerBubble(model);
    log.append(bubble.node);
    log.scrollTop = log.scrollHeight;
    // With images: OpenAI's content parts (the server reads Mistral's too); they stay in the
    // history, so that follow-up questions are about the same pictures.
    chat.history.push({ role: "user", content: images.length ? [{ type: "text", text },
      ...images.map((image) => ({ type: "image_url", image_url: { url: image.url } }))] : text });
    const messages = [];
    const system = $("chat-system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...chat.history);
    const body = { model, messages, ...sampling("chat") };
    if (tools) body.tools = tools;
    chat.controller = new AbortController();
    chatBusy(true);
    const follow = new MutationObserver(() => { log.scrollTop = log.scrollHeight; });
    follow.observe(bubble.node, { childList: true, subtree: true, characterData: true });
    try {
      const answer = await runAnswer(body, bubble, chat.controller.signal);
      if (answer.toolCalls.length) {
        chat.history.push({ role: "assistant", content: answer.content || null,
          tool_calls: answer.toolCalls.map((c) => ({ id: c.id, type: "function", function: { name: c.name, arguments: c.arguments } })) });
        for (const c of answer.toolCalls) {
          chat.history.push({ role: "tool", tool_call_id: c.id, name: c.name, content: "(the console runs no tools)" });
        }
      } else if (answer.content) {
        chat.history.push({ role: "assistant", content: answer.content });
      } else {
        chat.history.pop();  // no answer: the question is not kept either
      }
    } finally {
      follow.disconnect();
      chat.controller = null;
      chatBusy(false);
      input.focus();
    }
  });
  $("chat-stop").addEventListener("click", () => chat.controller?.abort());
  $("chat-clear").addEventListener("click", () => {
    chat.controller?.abort();
    chat.history = [];
    $("chat-log").replaceChildren($("chat-empty"));
    show($("chat-empty"), true);
    input.focus();
  });
}

function alertInLog(message) {
  const log = $("chat-log");
  show($("chat-empty"), false);
  log.append(el("p", { class: "error", role: "alert", text: message }));
}

function askForKeyOrReload() {
  refreshModels();
  alertInLog("No model to ask yet: the model list did not load (an API key may be needed).");
}

// ------------------------------------------------------------------ compare

const compare = { controllers: [] };

function initCompare() {
  const form = $("compare-form");
  enterSends($("compare-input"), form);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (compare.controllers.length) return;
    const text = $("compare-input").value;
    if (!text.trim()) return;
    const messages = [];
    const system = $("compare-system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: text });
    const params = sampling("compare");
    $("compare-send").disabled = true;
    $("compare-stop").disabled = false;
    const runs = [["a", $("compare-model-a").value], ["b", $("compare-model-b").value]].map(([side, model]) => {
      const column = $(`compare-${side}`);
      const bubble = answerBubble(model || "(no model)");
      column.replaceChildren(bubble.node);
      const controller = new AbortController();
      compare.controllers.push(controller);
      return runAnswer({ model, messages, ...params }, bubble, controller.signal);
    });
    try {
      await Promise.allSettled(runs);
    } finally {
      compare.controllers = [];
      $("compare-send").disabled = false;
      $("compare-stop").disabled = true;
    }
  });
  $("compare-stop").addEventListener("click", () => { for (const c of compare.controllers) c.abort(); });
}

// ------------------------------------------------------------------ data

let files = [];
let pendingFile = null;  // the File chosen, checked or being checked

async function refreshFiles() {
  try {
    const list = await api("v1/files?limit=10000&order=desc");
    files = list.data;
    setError($("files-error"), "");
  } catch (e) {
    setError($("files-error"), `The files could not be listed: ${e.message}`);
    return;
  }
  const body = $("files-body");
  body.replaceChildren();
  for (const f of files) {
    const del = el("button", { type: "button", class: "danger small", "aria-label": `Delete ${f.filename}` }, "Delete");
    del.addEventListener("click", () => deleteFile(f, del));
    body.append(el("tr", { "data-id": f.id },
      el("td", { class: "name", text: f.filename }), el("td", {}, el("code", { text: f.id })),
      el("td", { text: f.purpose }), el("td", { class: "num", text: f.num_lines ?? "" }),
      el("td", { class: "num", text: formatBytes(f.bytes) }), el("td", { text: formatTime(f.created_at) }),
      el("td", {}, del)));
  }
  show($("files-empty"), files.length === 0);
  fillFileSelects();
}

async function deleteFile(f, button) {
  if (button.dataset.confirm !== "1") {  // two clicks: the first asks
    button.dataset.confirm = "1";
    button.textContent = "Really delete?";
    setTimeout(() => { if (button.isConnected) { button.dataset.confirm = ""; button.textContent = "Delete"; } }, 5000);
    return;
  }
  button.disabled = true;
  try {
    await api(`v1/files/${encodeURIComponent(f.id)}`, { method: "DELETE" });
  } catch (e) {
    setError($("files-error"), `${f.filename}: ${e.message}`);
  }
  refreshFiles();
}

const PREVIEW_MAX_BYTES = 16 * 1024 * 1024;

/** The text of the lines the validation names, to show beside their problems (the checks are the server's). */
async function linePreviews(file, numbers) {
  const out = new Map();
  if (!numbers.length || file.size > PREVIEW_MAX_BYTES) return out;
  const wanted = new Set(numbers);
  const lines = new TextDecoder("utf-8", { fatal: false }).decode(await file.arrayBuffer()).split("\n");
  for (const n of wanted) if (n - 1 < lines.length) out.set(n, lines[n - 1].slice(0, 300));
  return out;
}

async function checkFile() {
  const file = pendingFile;
  const box = $("validation");
  $("upload-send").disabled = true;
  $("upload-check").disabled = !file;
  if (!file) { show(box, false); return; }
  box.className = "validation";
  show(box, true);
  $("validation-summary").textContent = `Checking ${file.name}…`;
  $("validation-problems").replaceChildren();
  const form = new FormData();
  form.append("purpose", $("upload-purpose").value);
  form.append("file", file, file.name);
  let result;
  try {
    result = await api("v1/files/validate", { method: "POST", form });
  } catch (e) {
    box.className = "validation bad";
    $("validation-summary").textContent = `${file.name}: ${e.message}`;
    return;
  }
  if (file !== pendingFile) return;  // another file was chosen meanwhile
  box.className = `validation ${result.ok ? "ok" : "bad"}`;
  box.dataset.ok = String(result.ok);
  if (result.ok) {
    const d = result.details || {};
    const facts = [`${result.num_lines} lines`];
    if (d.tokens != null) facts.push(`${d.tokens} tokens (${d.trained_tokens} trained)`, `longest sample ${d.longest_sample} tokens`);
    $("validation-summary").textContent = `${result.filename}: every line is valid (${facts.join(", ")}). Nothing is stored until you upload it.`;
    $("upload-send").disabled = false;
  } else if (result.error) {
    $("validation-summary").textContent = `${result.filename}: ${result.error}. Nothing was stored.`;
  } else {
    const more = result.num_problems > result.problems.length ? ` (the first ${result.problems.length} are listed)` : "";
    $("validation-summary").textContent =
      `${result.filename}: ${result.num_problems} of ${result.num_lines} lines cannot be used${more}. Nothing was stored.`;
  }
  const previews = await linePreviews(file, result.problems.map((p) => p.line));
  const list = $("validation-problems");
  for (const p of result.problems) {
    const item = el("li", { "data-line": p.line }, el("span", { class: "line", text: `line ${p.line}` }),
      el("span", { class: "reason", text: p.reason }));
    if (previews.has(p.line)) item.append(el("code", { class: "preview", text: previews.get(p.line) || "(empty)" }));
    list.append(item);
  }
}

function initData() {
  $("upload-file").addEventListener("change", () => {
    pendingFile = $("upload-file").files[0] || null;
    checkFile();
  });
  $("upload-purpose").addEventListener("change", checkFile);
  $("upload-check").addEventListener("click", checkFile);
  $("upload-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = pendingFile;
    if (!file) return;
    $("upload-send").disabled = true;
    const form = new FormData();
    form.append("purpose", $("upload-purpose").value);
    form.append("file", file, file.name);
    try {
      const record = await api("v1/files", { method: "POST", form });
      $("validation-summary").textContent = `${record.filename} is stored as ${record.id}.`;
      $("upload-file").value = "";
      pendingFile = null;
      $("upload-check").disabled = true;
    } catch (e) {
      $("validation").className = "validation bad";
      $("validation-summary").textContent = `${file.name}: ${e.message}`;
      $("upload-send").disabled = false;
    }
    refreshFiles();
  });
  $("files-refresh").addEventListener("click", refreshFiles);
}

// ------------------------------------------------------------------ fine-tuning

const FINISHED = ["succeeded", "failed", "cancelled"];
const watch = { id: null, token: null, job: null, events: new Map(), timer: null };

function fillFileSelects() {
  const tuning = files.filter((f) => f.purpose === "fine-tune");
  for (const [id, optional] of [["ft-training", false], ["ft-validation", true]]) {
    const select = $(id);
    const previous = select.value;
    select.replaceChildren();
    if (optional) select.append(new Option("(none)", ""));
    else if (!tuning.length) select.append(new Option("(upload a fine-tune file first)", ""));
    for (const f of tuning) select.append(new Option(`${f.filename} (${f.id})`, f.id));
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  }
}

async function refreshJobs() {
  let list;
  try {
    list = await api("v1/fine_tuning/jobs?limit=50");
  } catch (e) {
    setError($("ft-form-error"), `The jobs could not be listed: ${e.message}`);
    return;
  }
  const ul = $("jobs-list");
  ul.replaceChildren();
  for (const job of list.data) {
    const button = el("button", { type: "button", "aria-current": job.id === watch.id ? "true" : "false" },
      el("span", { class: "id", text: job.id }), el("span", { class: `badge ${job.status}`, text: job.status }),
      el("span", { class: "model", text: job.fine_tuned_model || job.model }),
      el("span", { class: "muted", text: formatTime(job.created_at) }));
    button.addEventListener("click", () => watchJob(job.id));
    ul.append(el("li", {}, button));
  }
  show($("jobs-empty"), list.data.length === 0);
}

function initFinetune() {
  $("ft-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setError($("ft-form-error"), "");
    const training = $("ft-training").value;
    if (!training) { setError($("ft-form-error"), "Choose a training file (upload one in Data)."); return; }
    const hp = { batch_size: numberOf($("ft-batch")) ?? 1, learning_rate_multiplier: numberOf($("ft-lr")) ?? 1 };
    const steps = numberOf($("ft-steps"));
    if (steps !== undefined) hp.training_steps = Math.round(steps);
    else hp.n_epochs = numberOf($("ft-epochs")) ?? 3;
    const rank = numberOf($("ft-rank"));
    if (rank !== undefined) hp.lora_rank = Math.round(rank);
    const seqLen = numberOf($("ft-seq-len"));
    if (seqLen !== undefined) hp.seq_len = Math.round(seqLen);
    const body = { model: $("ft-model").value, training_file: training, hyperparameters: hp };
    if ($("ft-validation").value) body.validation_file = $("ft-validation").value;
    const suffix = $("ft-suffix").value.trim();
    if (suffix) body.suffix = suffix;
    $("ft-create").disabled = true;
    try {
      const job = await api("v1/fine_tuning/jobs", { method: "POST", json: body });
      await watchJob(job.id);
      refreshJobs();
    } catch (e) {
      setError($("ft-form-error"), e.message);
    } finally {
      $("ft-create").disabled = false;
    }
  });
  $("jobs-refresh").addEventListener("click", refreshJobs);
  $("job-cancel").addEventListener("click", async () => {
    if (!watch.id) return;
    $("job-cancel").disabled = true;
    try {
      renderJob(await api(`v1/fine_tuning/jobs/${encodeURIComponent(watch.id)}/cancel`, { method: "POST" }));
    } catch (e) {
      setError($("job-error"), e.message);
      $("job-cancel").disabled = false;
    }
    refreshJobs();
  });
  $("job-chat").addEventListener("click", async () => {
    const model = watch.job?.fine_tuned_model;
    if (!model) return;
    await refreshModels();
    const select = $("chat-model");
    if (![...select.options].some((o) => o.value === model)) select.append(new Option(model, model));
    select.value = model;
    $("chat-clear").click();
    selectTab("chat");
    $("chat-input").focus();
  });
}

async function watchJob(id) {
  clearTimeout(watch.timer);
  const token = {};  // a poll of another watch (an older one, still in flight) stops at its next turn
  Object.assign(watch, { id, token, job: null, events: new Map() });
  setError($("job-error"), "");
  $("job-chart").replaceChildren();
  show($("job"), true);
  for (const b of $("jobs-list").querySelectorAll("button")) {
    b.setAttribute("aria-current", String(b.querySelector(".id")?.textContent === id));
  }
  await pollJob(token);
}

async function pollJob(token) {
  const id = watch.id;
  if (token !== watch.token) return;
  try {
    const job = await api(`v1/fine_tuning/jobs/${encodeURIComponent(id)}`);
    await readEvents(id, token);
    if (token !== watch.token) return;
    renderJob(job);
    if (FINISHED.includes(job.status)) {
      refreshJobs();
      if (job.status === "succeeded") refreshModels();
      return;
    }
  } catch (e) {
    if (token === watch.token) setError($("job-error"), e.message);
  }
  if (token === watch.token) watch.timer = setTimeout(() => pollJob(token), POLL_MS);
}

/** The job's new events: pages of the newest first, until one already read. */
async function readEvents(id, token) {
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: "500" });
    if (after) query.set("after", after);
    const page = await api(`v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?${query}`);
    if (token !== watch.token) return;
    let known = false;
    for (const e of page.data) {
      if (watch.events.has(e.id)) { known = true; break; }
      watch.events.set(e.id, e);
    }
    if (known || !page.has_more || !page.data.length) return;
    after = page.data[page.data.length - 1].id;
  }
}

function renderJob(job) {
  watch.job = job;
  for (const b of $("jobs-list").querySelectorAll("button")) {  // the list's line of this job follows it
    if (b.querySelector(".id")?.textContent !== job.id) continue;
    const badge = b.querySelector(".badge");
    badge.textContent = job.status;
    badge.className = `badge ${job.status}`;
    if (job.fine_tuned_model) b.querySelector(".model").textContent = job.fine_tuned_model;
  }
  $("job-title").textContent = job.fine_tuned_model || job.id;
  const badge = $("job-status");
  badge.textContent = job.status;
  badge.className = `badge ${job.status}`;
  const metrics = [...watch.events.values()].filter((e) => e.type === "metrics" && e.data).map((e) => e.data);
  const train = metrics.filter((m) => m.train_loss != null).sort((a, b) => a.step - b.step);
  const valid = metrics.filter((m) => m.valid_loss != null).sort((a, b) => a.step - b.step);
  const last = train[train.length - 1];
  const total = (last || valid[valid.length - 1])?.total_steps;
  const step = Math.max(last?.step || 0, valid[valid.length - 1]?.step || 0);
  const progress = $("job-progress");
  progress.max = total || 1;
  progress.value = job.status === "succeeded" ? progress.max : Math.min(step, total || 1);
  const facts = [`job ${job.id}`, `base ${job.model}`];
  if (total) facts.push(`step ${step} of ${total}`);
  if (last) {
    facts.push(`training loss ${last.train_loss.toFixed(4)}`);
    if (last.tokens_per_s) facts.push(`${last.tokens_per_s} tokens/s`);
    if (!FINISHED.includes(job.status) && last.eta_seconds != null) facts.push(`about ${formatDuration(last.eta_seconds)} left`);
  }
  if (valid.length) facts.push(`eval loss ${valid[valid.length - 1].valid_loss.toFixed(4)}`);
  if (job.trained_tokens) facts.push(`${job.trained_tokens} tokens trained`);
  $("job-facts").textContent = facts.join(" · ");
  drawChart($("job-chart"), train, valid, total);
  if (job.error && (job.error.message || job.error.code)) setError($("job-error"), job.error.message || job.error.code);
  show($("job-cancel"), !FINISHED.includes(job.status));
  $("job-cancel").disabled = false;
  show($("job-chat"), job.status === "succeeded" && Boolean(job.fine_tuned_model));
}

// ------------------------------------------------------------------ the loss chart (SVG)

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const step0 = span / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** Training loss (a line) and eval loss (a line with dots) against the step. */
function drawChart(node, train, valid, total) {
  // Drawn in the pixels it has (redrawn on resize): text and lines keep their shapes.
  const W = Math.max(240, Math.round(node.clientWidth || 640)), H = Math.max(160, Math.round(node.clientHeight || 300));
  const L = 48, R = 12, T = 12, B = 30;
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  node.replaceChildren();
  node.setAttribute("data-points", String(train.length));
  node.setAttribute("data-valid-points", String(valid.length));
  const all = [...train.map((m) => m.train_loss), ...valid.map((m) => m.valid_loss)];
  if (!all.length) {
    node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "waiting for the first logged step…"));
    return;
  }
  const maxStep = Math.max(total || 0, ...train.map((m) => m.step), ...valid.map((m) => m.step), 1);
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.05;
  lo = Math.max(0, lo - pad); hi += pad;
  const x = (s) => L + (s / maxStep) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  for (const v of niceTicks(lo, hi, 5)) {
    node.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    node.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(2)));
  }
  for (const s of niceTicks(0, maxStep, 6)) {
    node.append(svg("text", { x: x(s), y: H - 10, "text-anchor": "middle" }, String(s)));
  }
  node.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  node.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  node.append(svg("text", { x: W - R, y: H - B - 6, "text-anchor": "end" }, "step"));
  const line = (points, cls) => svg("polyline", { class: cls, points: points.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ") });
  if (train.length) node.append(line(train.map((m) => [m.step, m.train_loss]), "train"));
  if (valid.length) {
    node.append(line(valid.map((m) => [m.step, m.valid_loss]), "valid"));
    for (const m of valid) node.append(svg("circle", { class: "valid", cx: x(m.step), cy: y(m.valid_loss), r: 3.5 }));
  }
  node.setAttribute("aria-label", `Loss curves: ${train.length} training points` +
    (train.length ? `, last training loss ${train[train.length - 1].train_loss.toFixed(3)}` : "") +
    (valid.length ? `, last eval loss ${valid[valid.length - 1].valid_loss.toFixed(3)}` : ""));
}

// ------------------------------------------------------------------ start

function refreshAll() {
  refreshModels();
  const tab = location.hash.slice(1);
  if (tab === "data" || tab === "finetune") refreshFiles();
  if (tab === "finetune") refreshJobs();
}

document.addEventListener("DOMContentLoaded", () => {
  initKey();
  initTabs();
  initChat();
  initCompare();
  initData();
  initFinetune();
  selectTab(location.hash.slice(1) || "chat");
  refreshModels();
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { if (watch.job) renderJob(watch.job); }, 150);
  });
});
