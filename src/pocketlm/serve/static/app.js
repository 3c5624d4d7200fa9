// pocketlm chat page. Talks to the same-origin OpenAI-compatible API (/v1/models, /v1/chat/completions with
// stream=true). Safety: user text is only ever set with textContent; a reply is rendered from Markdown with raw
// HTML escaped (it shows as text), then sanitised by DOMPurify (no scripts, handlers, forms, images or
// non-http(s)/mailto links) before it touches the page; the page's CSP forbids inline and foreign scripts too.
// State: conversations and settings live in localStorage (this browser only); export/import moves them as JSON.
"use strict";

import { Marked } from "./marked.esm.js";
import hljs from "./hljs-core.min.js";
import bash from "./hljs-bash.min.js";
import c from "./hljs-c.min.js";
import cpp from "./hljs-cpp.min.js";
import diff from "./hljs-diff.min.js";
import go from "./hljs-go.min.js";
import java from "./hljs-java.min.js";
import javascript from "./hljs-javascript.min.js";
import json from "./hljs-json.min.js";
import markdown from "./hljs-markdown.min.js";
import python from "./hljs-python.min.js";
import rust from "./hljs-rust.min.js";
import shell from "./hljs-shell.min.js";
import sql from "./hljs-sql.min.js";
import typescript from "./hljs-typescript.min.js";
import xml from "./hljs-xml.min.js";
import yaml from "./hljs-yaml.min.js";

for (const [name, lang] of Object.entries({bash, c, cpp, diff, go, java, javascript, json, markdown, python, rust,
                                           shell, sql, typescript, xml, yaml})) {
  hljs.registerLanguage(name, lang);
}

const STORE_KEY = "pocketlm.chats.v1";
const SETTINGS_KEY = "pocketlm.settings.v1";
const EXPORT_FORMAT = "pocketlm-chats";
const MAX_IMPORT_BYTES = 50 * 1024 * 1024;
const MAX_IMAGE_BYTES = 3 * 1024 * 1024;  // one attached image (the server's default body limit is 4 MiB)
const MAX_IMAGES = 8;  // per message
const IMAGE_URL = /^data:image\/(png|jpeg|gif|webp|bmp);base64,[A-Za-z0-9+/=]+$/;
const $ = (id) => document.getElementById(id);
let pendingImages = [];  // data: URLs attached to the next message

// ---------------------------------------------------------------- Markdown -> sanitised DOM

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (ch) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[ch]);
}

const markdown_ = new Marked({gfm: true, breaks: false});
markdown_.use({renderer: {
  // raw HTML in a reply is shown as text, never interpreted
  html({text}) { return escapeHtml(text); },
  // images are links: a reply must not make the browser fetch anything (nor leak data in a URL)
  image({href, text}) { return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`; },
  code({text, lang}) {
    const language = (lang || "").trim().split(/\s+/)[0].toLowerCase();
    const known = language && hljs.getLanguage(language);
    const body = known ? hljs.highlight(text, {language, ignoreIllegals: true}).value : escapeHtml(text);
    return `<div class="code-block"><div class="code-head"><span class="code-lang">${escapeHtml(language || "text")}` +
           `</span></div><pre><code class="hljs${known ? " language-" + escapeHtml(language) : ""}">${body}` +
           `</code></pre></div>\n`;
  },
}});

const SAFE_URL = /^(?:https?:|mailto:|#)/i;
const PURIFY_CONFIG = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "button", "textarea", "select", "option", "iframe", "object",
                "embed", "video", "audio", "source", "picture", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "id", "name"],
};
let purifyReady = false;

function setupPurify() {
  if (purifyReady || !window.DOMPurify) return purifyReady;
  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName === "A") {
      const href = node.getAttribute("href");
      if (href === null || !SAFE_URL.test(href.trim())) node.removeAttribute("href");
      else if (!href.startsWith("#")) { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer nofollow"); }
    }
  });
  purifyReady = true;
  return true;
}

/** A DocumentFragment for `text` rendered as Markdown and sanitised; plain text when DOMPurify is missing. */
function renderMarkdown(text) {
  if (!setupPurify()) {
    const frag = document.createDocumentFragment();
    const p = document.createElement("p");
    p.style.whiteSpace = "pre-wrap";
    p.textContent = text;
    frag.appendChild(p);
    return frag;
  }
  const frag = window.DOMPurify.sanitize(markdown_.parse(text), PURIFY_CONFIG);
  for (const table of frag.querySelectorAll("table")) {
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.appendChild(table);
  }
  for (const block of frag.querySelectorAll(".code-block")) {
    const code = block.querySelector("code");
    const head = block.querySelector(".code-head");
    if (!code || !head) continue;
    const btn = button("Copy", "copy-code", () => copyText(code.textContent, btn));
    head.appendChild(btn);
  }
  return frag;
}

// ---------------------------------------------------------------- small helpers

function button(label, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

async function copyText(text, btn) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(text); ok = true; }
  } catch (e) { ok = false; }
  if (!ok) {  // plain http from another machine: no Clipboard API, fall back to a selected textarea
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed"; ta.style.opacity = "0";
    document.body.appendChild(ta);
    ta.select();
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    ta.remove();
  }
  if (btn) {
    const label = btn.dataset.label || btn.textContent;
    btn.dataset.label = label;
    btn.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { btn.textContent = label; }, 1500);
  }
  return ok;
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function status(text, isError = false) {
  $("stats").textContent = text;
  $("stats").classList.toggle("error", isError);
}

// ---------------------------------------------------------------- storage

function readJSON(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch (e) { return fallback; }
}

function loadStore() {
  const s = readJSON(STORE_KEY, null);
  const store = {current: null, conversations: []};
  if (s && Array.isArray(s.conversations)) {
    for (const c of s.conversations) {
      const conv = validConversation(c);
      if (conv) store.conversations.push(conv);
    }
    store.current = typeof s.current === "string" ? s.current : null;
  }
  for (const conv of store.conversations) {  // a reply that was streaming when the page went away is partial
    for (const m of conv.messages) if (m.state === "streaming") { m.state = "stopped"; m.note = "interrupted (page reloaded)"; }
  }
  return store;
}

let store = loadStore();
let saveFailed = false;

function save() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(store));
    if (saveFailed) { saveFailed = false; status(""); }
  } catch (e) {
    saveFailed = true;
    status(`could not save conversations in this browser (${e.name}: storage full?); export them and delete some`, true);
  }
}

/** A clean conversation from untrusted JSON (storage or an import), or null when it is not one. */
function validConversation(c) {
  if (!c || typeof c !== "object" || !Array.isArray(c.messages)) return null;
  const messages = [];
  for (const m of c.messages) {
    if (!m || !["user", "assistant"].includes(m.role) || typeof m.content !== "string") return null;
    const msg = {role: m.role, content: m.content};
    if (m.role === "user" && Array.isArray(m.images)) {  // only image data URLs, nothing that could load elsewhere
      const images = m.images.filter((u) => typeof u === "string" && IMAGE_URL.test(u)).slice(0, MAX_IMAGES);
      if (images.length) msg.images = images;
    }
    if (m.role === "assistant") {
      msg.state = ["done", "stopped", "error", "streaming"].includes(m.state) ? m.state : "done";
      if (typeof m.note === "string") msg.note = m.note.slice(0, 500);
      if (m.figures && typeof m.figures === "object") msg.figures = cleanFigures(m.figures);
    }
    messages.push(msg);
  }
  const now = Date.now();
  return {id: typeof c.id === "string" && c.id ? c.id.slice(0, 64) : newId(),
          title: typeof c.title === "string" ? c.title.slice(0, 200) : "",
          created: Number.isFinite(c.created) ? c.created : now, updated: Number.isFinite(c.updated) ? c.updated : now,
          messages};
}

function cleanFigures(f) {
  const out = {};
  for (const k of ["prompt_tokens", "completion_tokens", "ttft_s", "tokens_per_s"]) {
    if (Number.isFinite(f[k])) out[k] = f[k];
  }
  if (typeof f.finish === "string") out.finish = f.finish.slice(0, 40);
  if (f.approx === true) out.approx = true;
  return out;
}

const defaultSettings = {system: "", temperature: 0.7, top_p: 1, max_tokens: 512, model: "", apiKey: ""};
let settings = {...defaultSettings, ...readJSON(SETTINGS_KEY, {})};

function saveSettings() {
  try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings)); } catch (e) { /* the settings still apply */ }
}

function currentConversation() {
  return store.conversations.find((c) => c.id === store.current) || null;
}

function conversationTitle(conv) {
  if (conv.title) return conv.title;
  const first = conv.messages.find((m) => m.role === "user");
  if (!first) return "New chat";
  const line = first.content.trim().split("\n")[0];
  return line.length > 48 ? line.slice(0, 47) + "…" : line || "New chat";
}

// ---------------------------------------------------------------- conversation list (sidebar)

function renderSidebar() {
  const ul = $("conversations");
  ul.replaceChildren();
  const sorted = [...store.conversations].sort((a, b) => b.updated - a.updated);
  for (const conv of sorted) {
    const li = document.createElement("li");
    li.dataset.id = conv.id;
    if (conv.id === store.current) li.classList.add("current");
    const title = button(conversationTitle(conv), "conv-title", () => switchTo(conv.id));
    title.title = conversationTitle(conv);
    const rename = button("✎", "icon conv-rename", () => startRename(li, conv));
    rename.setAttribute("aria-label", "Rename");
    const del = button("✕", "icon conv-delete", () => {
      if (del.classList.contains("armed")) { deleteConversation(conv.id); return; }
      del.classList.add("armed");
      del.textContent = "Delete?";
      setTimeout(() => { if (del.isConnected) { del.classList.remove("armed"); del.textContent = "✕"; } }, 3000);
    });
    del.setAttribute("aria-label", "Delete");
    li.append(title, rename, del);
    ul.appendChild(li);
  }
}

function startRename(li, conv) {
  const input = document.createElement("input");
  input.className = "conv-rename-input";
  input.value = conversationTitle(conv);
  input.maxLength = 200;
  let done = false;
  const finish = (commit) => {
    if (done) return;
    done = true;
    if (commit) {
      conv.title = input.value.trim();
      save();
    }
    renderSidebar();
    if (conv.id === store.current) $("title").textContent = conversationTitle(conv);
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
  li.replaceChildren(input);
  input.focus();
  input.select();
}

function stopRunning() {
  if (running) running.controller.abort();
}

function switchTo(id) {
  stopRunning();
  store.current = id;
  save();
  renderAll();
  setSidebar(false);
}

function newChat() {
  stopRunning();
  const cur = currentConversation();
  if (cur && cur.messages.length === 0) { setSidebar(false); $("input").focus(); return; }  // reuse an empty one
  const now = Date.now();
  const conv = {id: newId(), title: "", created: now, updated: now, messages: []};
  store.conversations.push(conv);
  store.current = conv.id;
  save();
  renderAll();
  setSidebar(false);
  $("input").focus();
}

function deleteConversation(id) {
  if (running && running.conv.id === id) stopRunning();
  store.conversations = store.conversations.filter((c) => c.id !== id);
  if (store.current === id) {
    const next = [...store.conversations].sort((a, b) => b.updated - a.updated)[0];
    store.current = next ? next.id : null;
  }
  save();
  renderAll();
}

function exportConversations() {
  const data = {format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(),
                conversations: store.conversations};
  const blob = new Blob([JSON.stringify(data, null, 2)], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `pocketlm-chats-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  status(`exported ${store.conversations.length} conversation(s)`);
}

/** Merge conversations from an export (or a bare list, or one conversation); returns how many were added. */
function importConversations(text) {
  let data;
  try { data = JSON.parse(text); } catch (e) { throw new Error(`not JSON (${e.message})`); }
  const list = Array.isArray(data) ? data : (data && Array.isArray(data.conversations)) ? data.conversations
             : (data && Array.isArray(data.messages)) ? [data] : null;
  if (!list) throw new Error("no conversations in it (expected a pocketlm export: {\"conversations\": [...]})");
  const clean = [];
  for (let i = 0; i < list.length; i++) {
    const conv = validConversation(list[i]);
    if (!conv) throw new Error(`conversation ${i + 1} is not valid (each needs messages: [{role: "user"|"assistant", content: "..."}])`);
    for (const m of conv.messages) if (m.state === "streaming") m.state = "stopped";
    clean.push(conv);
  }
  const ids = new Set(store.conversations.map((c) => c.id));
  for (const conv of clean) {
    if (ids.has(conv.id)) conv.id = newId();
    ids.add(conv.id);
    store.conversations.push(conv);
  }
  if (clean.length) store.current = clean[clean.length - 1].id;
  save();
  renderAll();
  return clean.length;
}

// ---------------------------------------------------------------- messages

function messageElement(conv, index) {
  const m = conv.messages[index];
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  div.dataset.index = String(index);
  const content = document.createElement("div");
  content.className = "content";
  div.appendChild(content);
  if (m.role === "user") {
    if (m.images && m.images.length) div.insertBefore(thumbnails(m.images), content);
    content.textContent = m.content;
  } else {
    div.dataset.state = m.state || "done";
    content.appendChild(renderMarkdown(m.content));
    const note = document.createElement("div");
    note.className = "note" + (m.state === "error" ? " error" : "");
    note.textContent = m.note || (m.state === "stopped" ? "stopped" : "");
    if (note.textContent) div.appendChild(note);
    const figures = document.createElement("div");
    figures.className = "figures";
    figures.textContent = m.figures ? figuresText(m.figures) : "";
    div.appendChild(figures);
  }
  if (m.state !== "streaming") div.appendChild(messageActions(conv, index));
  return div;
}

function thumbnails(urls) {
  const box = document.createElement("div");
  box.className = "images";
  urls.forEach((u, i) => {
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = `image ${i + 1}`;
    img.src = u;  // a checked data: URL (IMAGE_URL); the page's CSP allows data: images only
    box.appendChild(img);
  });
  return box;
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  pendingImages.forEach((u, i) => {
    const item = document.createElement("div");
    item.className = "attachment";
    item.appendChild(thumbnails([u]).firstChild);
    item.appendChild(button("✕", "remove", () => { pendingImages.splice(i, 1); renderAttachments(); }));
    item.lastChild.setAttribute("aria-label", `remove image ${i + 1}`);
    box.appendChild(item);
  });
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attachFiles(files) {
  for (const file of files) {
    try {
      if (pendingImages.length >= MAX_IMAGES) throw new Error(`at most ${MAX_IMAGES} images per message`);
      if (file.size > MAX_IMAGE_BYTES) throw new Error(`${file.size} bytes, above the ${MAX_IMAGE_BYTES} byte limit`);
      const url = await readAsDataURL(file);
      if (!IMAGE_URL.test(url)) throw new Error("not a PNG, JPEG, GIF, WebP or BMP image");
      pendingImages.push(url);
    } catch (e) {
      status(`could not attach ${file.name}: ${e.message}`, true);
    }
  }
  renderAttachments();
}

function messageActions(conv, index) {
  const m = conv.messages[index];
  const actions = document.createElement("div");
  actions.className = "actions";
  const last = index === conv.messages.length - 1;
  if (m.role === "user") {
    actions.appendChild(button("Edit", "edit", () => startEdit(conv, index)));
    if (last) actions.appendChild(button("Reply", "reply", () => generate(conv)));  // e.g. after a failed reply was removed
  } else {
    const copy = button("Copy", "copy", () => copyText(m.content, copy));
    actions.appendChild(copy);
    if (last) actions.appendChild(button(m.state === "error" ? "Retry" : "Regenerate", "regenerate", () => regenerate(conv)));
  }
  return actions;
}

function figuresText(f) {
  const parts = [];
  const approx = f.approx ? "~" : "";
  if (Number.isFinite(f.prompt_tokens)) parts.push(`${f.prompt_tokens} prompt tokens`);
  if (Number.isFinite(f.completion_tokens)) parts.push(`${approx}${f.completion_tokens} completion tokens`);
  if (Number.isFinite(f.ttft_s)) parts.push(`first token ${f.ttft_s.toFixed(2)} s`);
  if (Number.isFinite(f.tokens_per_s)) parts.push(`${approx}${f.tokens_per_s.toFixed(1)} tokens/s`);
  if (f.finish && f.finish !== "stop") parts.push(`finish: ${f.finish}`);
  return parts.join(" · ");
}

function nearBottom() {
  const el = $("messages");
  return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const conv = currentConversation();
  if (!conv || conv.messages.length === 0) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Start a conversation: type a message below.";
    box.appendChild(empty);
    return;
  }
  conv.messages.forEach((_, i) => box.appendChild(messageElement(conv, i)));
  box.scrollTop = box.scrollHeight;
}

function renderAll() {
  const conv = currentConversation();
  $("title").textContent = conv ? conversationTitle(conv) : "pocketlm";
  document.title = conv && conv.messages.length ? `${conversationTitle(conv)} · pocketlm` : "pocketlm chat";
  renderSidebar();
  renderMessages();
  setBusy(Boolean(running));
}

function startEdit(conv, index) {
  if (running) return;
  const el = $("messages").querySelector(`.msg[data-index="${index}"]`);
  if (!el) return;
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = conv.messages[index].content;
  const actions = document.createElement("div");
  actions.className = "actions";
  const sendEdit = () => {
    const text = box.value;
    if (!text.trim() || running) return;
    const images = conv.messages[index].images;  // an edit changes the text; the images stay
    conv.messages = conv.messages.slice(0, index);  // the edited turn replaces this one and everything after it
    conv.messages.push(images ? {role: "user", content: text, images} : {role: "user", content: text});
    touch(conv);
    renderAll();
    generate(conv);
  };
  actions.append(button("Send", "edit-send", sendEdit), button("Cancel", "edit-cancel", () => renderMessages()));
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendEdit(); }
    if (e.key === "Escape") { e.preventDefault(); renderMessages(); }
  });
  el.classList.add("editing");
  el.replaceChildren(box, actions);
  box.focus();
}

function touch(conv) {
  conv.updated = Date.now();
  save();
}

function regenerate(conv) {
  if (running) return;
  const last = conv.messages[conv.messages.length - 1];
  if (last && last.role === "assistant") conv.messages.pop();
  touch(conv);
  renderAll();
  generate(conv);
}

// ---------------------------------------------------------------- the API

let running = null;  // {conv, controller} of the reply being generated

function apiHeaders() {
  const h = {"Content-Type": "application/json"};
  const key = settings.apiKey.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(r) {
  const j = await r.json().catch(() => null);
  return (j && j.error && j.error.message) || `HTTP ${r.status} ${r.statusText}`.trim();
}

async function loadModels() {
  const select = $("model");
  $("model-status").textContent = "";
  try {
    const r = await fetch("/v1/models", {headers: apiHeaders()});
    if (!r.ok) {
      const msg = await errorMessage(r);
      $("model-status").textContent = r.status === 401 ? "API key needed (see Settings)" : `models: ${msg}`;
      if (r.status === 401) openSettings(true);
      return;
    }
    const j = await r.json();
    const ids = (j.data || []).map((m) => String(m.id));
    select.replaceChildren(...ids.map((id) => { const o = document.createElement("option"); o.value = id; o.textContent = id; return o; }));
    if (ids.includes(settings.model)) select.value = settings.model;
    else if (ids.length) { select.value = ids[0]; }
    select.dataset.loaded = "true";
  } catch (e) {
    $("model-status").textContent = "server unreachable";
  }
}

function requestBody(conv) {
  const messages = [];
  if (settings.system.trim()) messages.push({role: "system", content: settings.system});
  for (const m of conv.messages) {
    if (m.role === "assistant" && (m.state === "error" && !m.content)) continue;  // a failed reply with nothing shown
    if (m.role === "user" && m.images && m.images.length) {  // OpenAI image_url parts, then the text
      messages.push({role: "user", content: [...m.images.map((url) => ({type: "image_url", image_url: {url}})),
                                            {type: "text", text: m.content}]});
      continue;
    }
    messages.push({role: m.role, content: m.content});
  }
  const body = {model: $("model").value || settings.model || undefined, messages, stream: true,
                stream_options: {include_usage: true}};
  const num = (v) => (v === "" || v === null || !Number.isFinite(Number(v))) ? undefined : Number(v);
  for (const [k, v] of [["temperature", settings.temperature], ["top_p", settings.top_p], ["max_tokens", settings.max_tokens]]) {
    const n = num(v);
    if (n !== undefined) body[k] = n;
  }
  return body;
}

function setBusy(busy) {
  $("messages").setAttribute("aria-busy", String(busy));  // screen readers read the reply once, when complete
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  for (const b of $("messages").querySelectorAll(".actions button.edit, .actions button.regenerate, .actions button.reply")) {
    b.disabled = busy;
  }
}

/** Stream an assistant reply onto the end of `conv`; every outcome (done, stopped, error) leaves the page usable. */
async function generate(conv) {
  if (running) return;
  const msg = {role: "assistant", content: "", state: "streaming"};
  const body = requestBody(conv);
  conv.messages.push(msg);
  touch(conv);
  const controller = new AbortController();
  running = {conv, controller};
  const onPage = () => store.current === conv.id;
  let el = null;
  if (onPage()) {
    renderAll();
    el = $("messages").lastElementChild;
  }
  setBusy(true);
  status("waiting for the first token…");
  const t0 = performance.now();
  let tFirst = null, tLast = null, chunks = 0, usage = null, finish = null, sawDone = false;
  let renderTimer = null, lastSave = t0;
  const paint = () => {
    renderTimer = null;
    if (!el || !el.isConnected) return;
    const stick = nearBottom();
    el.querySelector(".content").replaceChildren(renderMarkdown(msg.content));
    if (stick) $("messages").scrollTop = $("messages").scrollHeight;
  };
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: apiHeaders(), body: JSON.stringify(body),
                                                    signal: controller.signal});
    if (!r.ok) {
      const text = await errorMessage(r);
      if (r.status === 429) {
        const wait = Math.max(1, Math.min(600, parseInt(r.headers.get("Retry-After") || "1", 10) || 1));
        throw Object.assign(new Error(`The server is busy (429: ${text}). Retry in ${wait} s.`), {retryAfter: wait});
      }
      if (r.status === 401) openSettings(true);
      throw new Error(`The server refused the request (${r.status}): ${text}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    outer: for (;;) {
      let chunk;
      try { chunk = await reader.read(); }
      catch (e) {
        if (e.name === "AbortError") throw e;
        throw new Error(`The connection to the server was lost mid-reply (${e.message}).`);
      }
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, {stream: true}).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") { sawDone = true; break outer; }
        let j;
        try { j = JSON.parse(data); } catch (e) { throw new Error(`The server sent a malformed event: ${data.slice(0, 80)}`); }
        if (j.error) throw new Error(`The server failed mid-reply: ${j.error.message || "unknown error"}`);
        if (j.usage) usage = j.usage;
        for (const ch of j.choices || []) {
          if (ch.index !== undefined && ch.index !== 0) continue;
          const piece = ch.delta && typeof ch.delta.content === "string" ? ch.delta.content : "";
          if (piece) {
            if (tFirst === null) tFirst = performance.now();
            tLast = performance.now();
            chunks += 1;
            msg.content += piece;
          }
          if (ch.finish_reason) finish = ch.finish_reason;
        }
        if (tFirst !== null) {
          const dt = (performance.now() - tFirst) / 1000;
          status(`generating… ~${chunks} tokens` + (dt > 0.2 ? `, ${((chunks - 1) / dt).toFixed(1)} tokens/s` : ""));
        }
        if (renderTimer === null) renderTimer = setTimeout(paint, 50);
        if (performance.now() - lastSave > 1000) { lastSave = performance.now(); save(); }
      }
    }
    if (!sawDone && finish === null) throw new Error("The connection to the server was lost mid-reply (the stream ended early).");
    msg.state = "done";
    msg.figures = figures(t0, tFirst, tLast, chunks, usage, finish, false);
    status("");
  } catch (e) {
    if (e.name === "AbortError") {
      msg.state = "stopped";
      msg.note = "stopped";
      msg.figures = figures(t0, tFirst, tLast, chunks, null, null, true);
      status("");
    } else {
      msg.state = "error";
      msg.note = e.message + (msg.content ? " The partial reply is kept; Retry asks again." : " Retry asks again.");
      if (tFirst !== null) msg.figures = figures(t0, tFirst, tLast, chunks, null, null, true);
      status(e.message, true);
      if (e.retryAfter) retryCountdown(conv, e.retryAfter);
    }
  } finally {
    if (renderTimer !== null) clearTimeout(renderTimer);
    running = null;
    touch(conv);
    if (onPage()) renderAll();
    setBusy(false);
  }
}

/** After a 429, the Retry button says how long until the server expects to have room, then enables itself. */
function retryCountdown(conv, seconds) {
  const end = Date.now() + seconds * 1000;
  const tick = () => {
    const btn = $("messages").querySelector(".actions button.regenerate");
    if (!btn || running || store.current !== conv.id) return;
    const left = Math.ceil((end - Date.now()) / 1000);
    if (left > 0) { btn.textContent = `Retry (${left} s)`; setTimeout(tick, 250); }
    else btn.textContent = "Retry";
  };
  setTimeout(tick, 0);
}

function figures(t0, tFirst, tLast, chunks, usage, finish, approx) {
  const f = {};
  if (usage) {
    f.prompt_tokens = usage.prompt_tokens;
    f.completion_tokens = usage.completion_tokens;
  } else {
    f.completion_tokens = chunks;  // one content chunk per token (the server sends one per token)
    f.approx = true;
  }
  if (tFirst !== null) {
    f.ttft_s = (tFirst - t0) / 1000;
    const n = usage ? usage.completion_tokens : chunks;
    const dt = ((tLast ?? tFirst) - tFirst) / 1000;
    // decode speed: the tokens after the first over the time after the first (the first one is the TTFT)
    if (n > 1 && dt > 0) f.tokens_per_s = (n - 1) / dt;
  }
  if (finish) f.finish = finish;
  if (approx) f.approx = true;
  return cleanFigures(f);
}

async function send() {
  const text = $("input").value;
  if ((!text.trim() && !pendingImages.length) || running) return;
  let conv = currentConversation();
  if (!conv) {
    const now = Date.now();
    conv = {id: newId(), title: "", created: now, updated: now, messages: []};
    store.conversations.push(conv);
    store.current = conv.id;
  }
  $("input").value = "";
  const userMsg = {role: "user", content: text};
  if (pendingImages.length) userMsg.images = pendingImages;
  pendingImages = [];
  renderAttachments();
  conv.messages.push(userMsg);
  touch(conv);
  renderAll();
  if (!$("model").value) await loadModels();
  generate(conv);
}

// ---------------------------------------------------------------- settings, layout, wiring

function openSettings(open) {
  $("settings").hidden = !open;
  $("open-settings").setAttribute("aria-expanded", String(open));
}

function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("backdrop").hidden = !open;
}

function bindSetting(id, key, parse = (v) => v) {
  const el = $(id);
  el.value = settings[key] ?? "";
  el.addEventListener("input", () => { settings[key] = parse(el.value); saveSettings(); });
}

bindSetting("system", "system");
bindSetting("temperature", "temperature");
bindSetting("top-p", "top_p");
bindSetting("max-tokens", "max_tokens");
bindSetting("api-key", "apiKey");
$("api-key").addEventListener("change", loadModels);
$("model").addEventListener("change", () => { settings.model = $("model").value; saveSettings(); });
$("open-settings").addEventListener("click", () => openSettings($("settings").hidden));
$("open-sidebar").addEventListener("click", () => setSidebar(true));
$("close-sidebar").addEventListener("click", () => setSidebar(false));
$("backdrop").addEventListener("click", () => setSidebar(false));
$("new-chat").addEventListener("click", newChat);
$("export").addEventListener("click", exportConversations);
$("import").addEventListener("click", () => $("import-file").click());
$("import-file").addEventListener("change", async () => {
  const file = $("import-file").files[0];
  $("import-file").value = "";
  if (!file) return;
  try {
    if (file.size > MAX_IMPORT_BYTES) throw new Error(`the file is ${file.size} bytes, above the ${MAX_IMPORT_BYTES} byte limit`);
    const n = importConversations(await file.text());
    status(`imported ${n} conversation(s) from ${file.name}`);
  } catch (e) {
    status(`could not import ${file.name}: ${e.message}`, true);
  }
});
$("send").addEventListener("click", send);
$("attach").addEventListener("click", () => $("attach-file").click());
$("attach-file").addEventListener("change", async () => {
  const files = [...$("attach-file").files];
  $("attach-file").value = "";
  await attachFiles(files);
});
$("stop").addEventListener("click", stopRunning);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
window.addEventListener("storage", (e) => {  // another tab changed the conversations
  if (e.key === STORE_KEY && !running) { store = loadStore(); renderAll(); }
});

if (!currentConversation() && store.conversations.length) {
  store.current = [...store.conversations].sort((a, b) => b.updated - a.updated)[0].id;
}
renderAll();
loadModels().then(() => { document.body.dataset.ready = "true"; });
