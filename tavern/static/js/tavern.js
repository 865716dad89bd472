/* Shared helpers of every Tavern page. Loaded by base.html after the Socket.IO client.
 *
 * Globals:
 *   socket                  the page's Socket.IO connection (same origin; reconnects by itself)
 *   apiGet(url)             GET JSON; throws Error(message) on HTTP errors
 *   apiPost(url, body)      POST JSON (or FormData) with the CSRF header; throws Error(message)
 *   Tavern.act(url, body, done, after)   a button's action: apiPost, toast `done` (or the error), then
 *                           await after() either way (e.g. refetch the page); resolves to the answer or null
 *   Tavern.el(tag, attrs, ...children)   build DOM safely: strings become text nodes (never HTML)
 *   Tavern.onResync(fn)     fn() runs at load and after every (re)connect: rebuild state from /api
 *   Tavern.fmt.*            number / duration / bytes / time formatting
 *   Tavern.toast(msg, level)
 * Never put data into innerHTML: use el() or textContent.
 */
(function () {
  "use strict";
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.getAttribute("content") : "";
  const MAX_TOASTS = 3;

  async function parse(resp) {
    const type = resp.headers.get("Content-Type") || "";
    const data = type.includes("application/json") ? await resp.json() : await resp.text();
    if (!resp.ok) {
      const msg = (data && data.error) ? data.error : ("HTTP " + resp.status);
      const err = new Error(msg);
      err.status = resp.status;
      err.data = data;
      throw err;
    }
    return data;
  }

  async function apiGet(url) {
    return parse(await fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}));
  }

  async function apiPost(url, body) {
    const headers = {"Accept": "application/json", "X-CSRF-Token": csrf};
    let payload = body;
    if (!(body instanceof FormData)) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body === undefined ? {} : body);
    }
    return parse(await fetch(url, {method: "POST", credentials: "same-origin", headers, body: payload}));
  }

  async function act(url, body, done, after) {
    let answer = null;
    try {
      answer = await apiPost(url, body);
      toast(done, "success");
    } catch (e) {
      toast(e.message, "error");
    }
    if (after) await after();
    return answer;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = String(v);
      else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const fmt = {
    num(x, digits) {
      if (x === null || x === undefined || Number.isNaN(x)) return "—";
      if (digits !== undefined) return Number(x).toFixed(digits);
      return Number(x).toLocaleString("en-US");
    },
    sci(x) {
      if (x === null || x === undefined) return "—";
      return Number(x).toExponential(2);
    },
    duration(seconds) {
      if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
      let s = Math.max(0, Math.round(seconds));
      const d = Math.floor(s / 86400); s -= d * 86400;
      const h = Math.floor(s / 3600); s -= h * 3600;
      const m = Math.floor(s / 60); s -= m * 60;
      if (d) return d + "d " + h + "h";
      if (h) return h + "h " + m + "m";
      if (m) return m + "m " + s + "s";
      return s + "s";
    },
    bytes(n) {
      if (n === null || n === undefined) return "—";
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let i = 0; let x = Number(n);
      while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
      return (i ? x.toFixed(1) : String(x)) + " " + units[i];
    },
    time(epochSeconds) {
      if (!epochSeconds) return "—";
      return new Date(epochSeconds * 1000).toLocaleTimeString();
    },
    datetime(epochSeconds) {
      if (!epochSeconds) return "—";
      return new Date(epochSeconds * 1000).toLocaleString();
    },
  };

  function toast(message, level) {
    const box = document.getElementById("toasts");
    if (!box) return;
    const t = el("div", {class: "toast " + (level || "info"), role: "status"}, message);
    while (box.children.length >= MAX_TOASTS) box.removeChild(box.firstChild);
    box.appendChild(t);
    setTimeout(() => t.remove(), 6000);
  }

  const resyncers = [];
  function onResync(fn) {
    resyncers.push(fn);
    if (document.readyState !== "loading") safe(fn);
  }
  function safe(fn) {
    try {
      const r = fn();
      if (r && r.catch) r.catch((e) => console.warn("resync failed:", e));
    } catch (e) { console.warn("resync failed:", e); }
  }
  function resyncAll() { resyncers.forEach(safe); }

  // The nav's status pills: filled from /api/status, then kept live by "status" and "step" events.
  function showStatus(st) {
    const ds = document.getElementById("daemon-state");
    if (ds && st && st.daemon && ds.dataset.state !== st.daemon.display_state) {
      ds.textContent = "daemon: " + st.daemon.display_state;
      ds.dataset.state = st.daemon.display_state;
    }
    if (st && st.metrics) showStep(st.metrics.global_step);
  }
  function showStep(step) {
    const gp = document.getElementById("global-step-pill");
    const text = "step " + fmt.num(step);
    if (gp && gp.textContent !== text) gp.textContent = text;
  }

  const socket = io({transports: ["websocket", "polling"], tryAllTransports: true});
  const conn = () => document.getElementById("conn");
  let everConnected = false;
  socket.on("connect", () => {
    const c = conn(); if (c) { c.textContent = "live"; c.dataset.state = "live"; }
    if (everConnected) resyncAll();  // a reconnect: anything pushed meanwhile was missed
    everConnected = true;
  });
  socket.on("disconnect", () => {
    const c = conn(); if (c) { c.textContent = "reconnecting…"; c.dataset.state = "down"; }
  });
  socket.on("connect_error", () => {
    const c = conn(); if (c) { c.textContent = "offline"; c.dataset.state = "down"; }
  });
  socket.on("status", showStatus);
  socket.on("step", (s) => showStep(s.global_step));
  socket.on("event", (e) => {
    if (e.level === "error" || e.level === "warning") toast(e.message, e.level);
  });

  window.socket = socket;
  window.apiGet = apiGet;
  window.apiPost = apiPost;
  window.Tavern = {csrf, el, fmt, toast, onResync, resyncAll, apiGet, apiPost, act, socket};

  onResync(() => apiGet("/api/status").then(showStatus));
  document.addEventListener("DOMContentLoaded", resyncAll);
})();
