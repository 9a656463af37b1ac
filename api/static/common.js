// merge-service dashboard: what every page shares. The API key lives in sessionStorage and
// goes out as a Bearer token; everything else is plain fetch against /v1. sessionStorage is per
// tab, so a new tab (a job opened in one) asks the open tabs of this origin for the key over a
// BroadcastChannel: the key is entered once per browser session and never written to disk.
"use strict";

const MS = (() => {
  const KEY = "merge-service.api-key";
  const authRequired = document.body.dataset.authRequired === "true";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

  class ApiError extends Error {
    constructor(status, body) {
      const err = (body && body.error) || {};
      super(err.message || `HTTP ${status}`);
      this.status = status;
      this.type = err.type || "HTTPError";
      this.problems = err.problems || [];
    }
  }

  function key() { return sessionStorage.getItem(KEY) || ""; }

  // the key shared between this origin's tabs: a tab without one asks, a tab with one answers;
  // "Forget key" forgets it in every tab
  const channel = "BroadcastChannel" in window ? new BroadcastChannel(KEY) : null;

  function adoptKey(value) {
    sessionStorage.setItem(KEY, value);
    notice("");
    showKeyState();
    document.dispatchEvent(new CustomEvent("ms:key"));
  }

  if (channel) {
    channel.onmessage = (ev) => {
      const m = ev.data || {};
      if (m.type === "ask" && key()) channel.postMessage({ type: "key", key: key() });
      else if (m.type === "key" && typeof m.key === "string" && m.key && !key()) adoptKey(m.key);
      else if (m.type === "forget" && key()) {
        sessionStorage.removeItem(KEY);
        showKeyState();
        if (authRequired) notice("The API key was forgotten in another tab. Enter an API key to continue.");
        document.dispatchEvent(new CustomEvent("ms:key-refused"));
      }
    };
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (key()) h.Authorization = `Bearer ${key()}`;
    return h;
  }

  function showKeyState() {
    const form = document.getElementById("key-form");
    const set = document.getElementById("key-set");
    form.hidden = !(authRequired && !key());
    set.hidden = !key();
  }

  function notice(message) {
    const box = document.getElementById("notice");
    // the same text again would be announced again (role=alert)
    if (box.textContent === (message || "") && box.hidden === !message) return;
    box.textContent = message || "";
    box.hidden = !message;
  }

  // the state of the live connections, shown and announced (role=status) while one is down
  let connectionTimer = null;
  function connection(message, fadeMs) {
    const box = document.getElementById("connection");
    if (!box) return;
    clearTimeout(connectionTimer);
    if (box.textContent !== (message || "")) box.textContent = message || "";
    box.classList.toggle("on", Boolean(message));
    if (message && fadeMs) connectionTimer = setTimeout(() => connection(""), fadeMs);
  }

  // A refused key: the prompt comes back, once. Focus moves to it only when it has nowhere
  // else to be (the key form's own button, or nothing): a poll that fails must not pull focus
  // from what someone is doing. Pages stop polling on `ms:key-refused` and start again on
  // `ms:key`.
  function needKey(message) {
    sessionStorage.removeItem(KEY);
    showKeyState();
    notice(message || "Enter an API key to continue.");
    const input = document.getElementById("api-key");
    const active = document.activeElement;
    if (input && (!active || active === document.body || active.closest(".key"))) input.focus();
    document.dispatchEvent(new CustomEvent("ms:key-refused"));
  }

  async function api(path, options) {
    // without a key this server answers 401 to everything: do not ask it again and again
    if (authRequired && !key()) throw new ApiError(401, { error: { type: "Unauthorized", message: "no API key" } });
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    if (opts.json !== undefined) {
      opts.body = JSON.stringify(opts.json);
      opts.headers["Content-Type"] = "application/json";
      delete opts.json;
    }
    const response = await fetch(path, opts);
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
    if (response.status === 401) {
      needKey(key() ? "That API key was refused; enter another." : "This server needs an API key.");
    }
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  // Server-Sent Events over fetch (EventSource cannot send Authorization). Reconnects with
  // Last-Event-ID until the stream ends after a terminal state or `signal` aborts; while it is
  // down (a dropped connection, a 5xx) the page says so. A refused key (401, 403) ends it
  // with the key prompt; the page starts it again on `ms:key`.
  async function events(path, onEvent, signal) {
    try {
      await follow(path, onEvent, signal);
    } finally {
      connection("");
    }
  }

  async function follow(path, onEvent, signal) {
    let lastId = null;
    let lastTry = false;
    let down = false;
    for (let attempt = 0; !signal.aborted; attempt++) {
      let finished = false;
      let failed = false;  // a network error or an error status, not a stream the server closed
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (lastId) h["Last-Event-ID"] = lastId;
        const response = await fetch(path, { headers: h, signal });
        if (response.status === 401) {
          needKey(key() ? "That API key was refused; enter another." : "This server needs an API key.");
          return;
        }
        if (response.status === 403) {
          needKey("This API key may not read this job's events; enter another.");
          return;
        }
        if (!response.ok) throw new ApiError(response.status, null);
        if (down) { down = false; connection("Live updates reconnected.", 4000); }
        await readEventStream(response, (ev) => {
          if (ev.id) lastId = ev.id;
          onEvent(ev);
          if (ev.type === "state" && TERMINAL.has(ev.data.status)) finished = true;
        });
        attempt = 0;
      } catch (e) {
        if (signal.aborted) return;
        if (e instanceof ApiError && e.status === 404) throw e;
        failed = true;
      }
      // the server closes the stream after the terminal event (or when the job had already
      // ended); anything else was a dropped connection: resume after the last event seen
      if (finished || signal.aborted) return;
      if (!lastTry) { down = true; connection("Live updates lost; reconnecting…"); }
      await new Promise((r) => setTimeout(r, Math.min(500 * 2 ** attempt, 8000)));
      // a server that is down says nothing about the job: keep trying until it answers
      if (!failed && await jobEnded(path)) {
        if (lastTry) return;
        lastTry = true;  // one more read delivers the events up to the end
      }
    }
  }

  // A text/event-stream response, event by event: onEvent({id, type, data}) with `data`
  // parsed as JSON; comments (connected, keepalive) and events without data are skipped.
  // Returns when the server closes the stream.
  async function readEventStream(response, onEvent) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const ev = { id: null, type: "message", data: "" };
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
          if (field === "id") ev.id = val;
          else if (field === "event") ev.type = val;
          else if (field === "data") ev.data += (ev.data ? "\n" : "") + val;
        }
        if (ev.data) onEvent({ id: ev.id, type: ev.type, data: JSON.parse(ev.data) });
      }
    }
  }

  async function jobEnded(eventsPath) {
    try {
      const job = await api(eventsPath.replace(/\/events$/, ""));
      return TERMINAL.has(job.status);
    } catch (e) { return false; }
  }

  // small DOM helper: el("td", {class: "num"}, "text", child, ...)
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function parseTime(value) { return value ? new Date(value) : null; }

  function duration(start, end) {
    if (!start) return "";
    const ms = (end || new Date()) - start;
    const s = Math.max(0, Math.round(ms / 100) / 10);
    if (s < 60) return `${s.toFixed(1)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function when(value) {
    const d = value instanceof Date ? value : parseTime(value);
    // with its zone: schedules are written in UTC, the browser may be elsewhere
    return d ? d.toLocaleString(undefined, { hour12: false, timeZoneName: "short" }) : "";
  }

  function progressText(p) {
    if (!p || !p.stage) return "";
    const parts = [p.stage];
    if (p.total) parts.push(`${p.done} / ${p.total}`);
    if (p.current) parts.push(p.current);
    return parts.join(" · ");
  }

  function fraction(job) {
    const p = job.progress || {};
    if (job.status === "succeeded") return 1;
    if (!p.total) return 0;
    // merging is the bulk of the work; finalizing and pushing come after it
    if (p.stage === "merging") return (p.done / p.total) * 0.95;
    if (p.stage === "finalizing" || p.stage === "pushing") return 0.95 + 0.05 * (p.done / p.total);
    return 0;
  }

  function errorText(e) {
    if (e instanceof ApiError) return `${e.type}: ${e.message}`;
    return String(e && e.message ? e.message : e);
  }

  document.addEventListener("DOMContentLoaded", () => {
    showKeyState();
    document.getElementById("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = document.getElementById("api-key");
      const value = input.value.trim();
      if (!value) return;
      input.value = "";
      adoptKey(value);
      if (channel) channel.postMessage({ type: "key", key: value });  // tabs still waiting for one
    });
    document.getElementById("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      showKeyState();
      if (channel) channel.postMessage({ type: "forget" });
      if (authRequired) needKey("Key forgotten. Enter an API key to continue.");
    });
    if (authRequired && !key() && channel) channel.postMessage({ type: "ask" });
  });

  return { api, events, readEventStream, el, duration, when, parseTime, progressText, fraction, errorText,
           notice, key, authRequired, TERMINAL, ApiError };
})();
