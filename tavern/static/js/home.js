/* Home (the battle): hero card, current quest, controls, loss chart, battle log.
 * State comes from /api/status, /api/history, /api/events at load and after every reconnect
 * (Tavern.onResync); Socket.IO events keep it live. All data is written with textContent. */
(function () {
  "use strict";
  const {el, fmt} = Tavern;
  const $ = (id) => document.getElementById(id);
  const MAX_LOG = 200;
  const HISTORY_POINTS = 1500;
  const CHART_MIN_REDRAW_MS = 500;  // live points are drawn at most twice a second (cheap with many tabs)

  // ---- hero, quest, metrics ------------------------------------------------------------------
  let lastStatus = null;
  let shownStep = 0;

  // Write only what changed: every write costs a layout and a repaint in each open tab.
  function setText(id, text) {
    const n = $(id);
    if (n && n.textContent !== String(text)) n.textContent = text;
  }
  function setBar(id, fraction) {
    const n = $(id);
    const width = (Math.max(0, Math.min(1, fraction || 0)) * 100).toFixed(1) + "%";
    if (n && n.style.width !== width) n.style.width = width;
  }

  function showStep(step) {
    if (step === null || step === undefined || step < shownStep) return;
    shownStep = step;
    setText("global-step", fmt.num(step));
  }

  function renderStatus(st) {
    lastStatus = st;
    const h = st.hero, m = st.metrics;
    setText("hero-name", h.name);
    setText("hero-title", h.title);
    setText("hero-level", "Lv " + h.level);
    setText("hero-total-level", "Total Lv " + h.total_level);
    const arch = [h.architecture, h.parameters ? fmt.num(h.parameters) + " parameters" : null,
      h.base_model ? "base: " + h.base_model : null].filter(Boolean).join(" · ");
    setText("hero-arch", arch || "architecture unknown until the daemon loads the hero");
    $("newborn-note").classList.toggle("hidden", !h.newborn);  // toggle() is a no-op when unchanged
    setText("hero-xp", fmt.num(h.xp) + " / " + fmt.num(h.xp_next_level) + " (level " + (h.level + 1) + ")");
    setBar("xp-bar", h.xp_progress);
    const b = h.blessing;
    setText("hero-blessed", fmt.num(b.blessed_xp, 1) + " of " + fmt.num(b.judged_effort) + " judged steps"
      + (b.quality === null ? "" : " (quality " + fmt.num(b.quality, 2) + ")"));
    setText("hero-unblessed", b.unblessed_effort ? "Unblessed effort: " + fmt.num(b.unblessed_effort)
      + " steps not yet confirmed by a trial or a held-out loss" : "");
    showStep(m.global_step);  // never backwards: a step event may be ahead of this status
    setText("atk", h.atk === null ? "—" : h.atk);
    setText("atk-sub", m.loss_window_mean === null ? "no training loss yet"
      : "loss " + fmt.num(m.loss_window_mean, 3) + " (mean of " + m.loss_window_steps + " steps)");
    setText("def", h.def === null ? "—" : h.def);
    setText("def-sub", m.eval_loss === null ? "no validation loss yet"
      : "validation loss " + fmt.num(m.eval_loss, 3) + " @ step " + fmt.num(m.eval_global_step));
    setText("strain", h.strain_zone || "—");
    const zoneClass = "value" + (h.strain_zone ? " zone-" + h.strain_zone : "");
    if ($("strain").className !== zoneClass) $("strain").className = zoneClass;
    setText("strain-sub", h.strain === null ? "grad_norm / max_grad_norm" : "grad_norm / max = " + fmt.num(h.strain, 2));
    setText("tokens-per-second", m.tokens_per_second === null ? "—" : fmt.num(Math.round(m.tokens_per_second)));
    setText("learning-rate", fmt.sci(m.learning_rate));
    setText("loss", m.loss === null ? "—" : fmt.num(m.loss, 4));
    setText("eval-loss-sub", "validation " + (m.eval_loss === null ? "—" : fmt.num(m.eval_loss, 4)));
    renderQuest(st.quest);
    const ck = st.last_checkpoint;
    setText("last-checkpoint", ck ? (ck.name || ("step " + (ck.global_step ?? ck.step))) : "none yet");
    updateControls(st.daemon);
  }

  function renderQuest(q) {
    $("quest-none").classList.toggle("hidden", !!q);
    $("quest-box").classList.toggle("hidden", !q);
    if (!q) return;
    setText("quest-name", q.name);
    setText("quest-state", q.state);
    setText("quest-priority", q.priority);
    setBar("quest-bar", q.progress);
    setText("quest-examples", fmt.num(q.examples_trained) + " / " + fmt.num(q.examples_total) + " examples"
      + (q.progress === null ? "" : " (" + (q.progress * 100).toFixed(1) + "%)"));
    setText("quest-eta", fmt.duration(q.eta_seconds));
  }

  // ---- controls ------------------------------------------------------------------------------
  let awaiting = null;  // id of the command whose answer we show
  function updateControls(daemon) {
    const s = daemon.display_state;
    const enabled = {
      pause: s === "training" || s === "idle" || s === "starting",
      resume: s === "paused",
      skip: (s === "training" || s === "paused") && !!(lastStatus && lastStatus.quest),
      stop: daemon.alive,
    };
    document.querySelectorAll("#controls button").forEach((b) => {
      b.disabled = !enabled[b.dataset.command];
    });
  }
  function showCommand(c) {
    if (!awaiting || c.id !== awaiting) return;
    if (c.state === "pending") { setText("command-result", c.command + ": sent, waiting for the daemon…"); return; }
    setText("command-result", c.command + ": " + c.state + (c.result ? " — " + c.result : ""));
    Tavern.toast(c.command + ": " + (c.result || c.state), c.state === "done" ? "success" : "error");
    awaiting = null;
  }
  document.querySelectorAll("#controls button").forEach((b) => b.addEventListener("click", async () => {
    const cmd = b.dataset.command;
    if (cmd === "stop" && !window.confirm("Stop training? The daemon saves a checkpoint first, then exits.")) return;
    try {
      const c = await apiPost("/api/controls/" + encodeURIComponent(cmd), {});
      awaiting = c.id;
      showCommand(c);
      setTimeout(async () => {  // the socket event normally arrives first; this covers a dropped connection
        if (awaiting === c.id) showCommand(await apiGet("/api/controls/" + c.id));
      }, 5000);
    } catch (e) {
      setText("command-result", cmd + ": " + e.message);
      Tavern.toast(e.message, "error");
    }
  }));

  // ---- loss chart (uPlot) -------------------------------------------------------------------
  const full = {train: [[], []], eval: [[], []], bucket: 1};
  let detail = null;  // {train, eval, min, max} while zoomed into a fetched range
  let plot = null;
  let redrawQueued = false;

  function joined(src) {
    if (!src.train[0].length && !src.eval[0].length) return [[], [], []];
    return uPlot.join([src.train, src.eval]);
  }
  function makePlot() {
    const box = $("loss-chart");
    const opts = {
      width: Math.max(300, box.clientWidth), height: 320,
      scales: {x: {time: false}},
      axes: [
        {label: "global_step", stroke: "#a89a86", grid: {stroke: "#3a3029"}, ticks: {stroke: "#3a3029"}},
        {label: "loss", stroke: "#a89a86", grid: {stroke: "#3a3029"}, ticks: {stroke: "#3a3029"}},
      ],
      series: [
        {label: "step"},
        {label: "train loss", stroke: "#e3b341", width: 1.5, spanGaps: true, points: {show: false}},
        {label: "validation loss", stroke: "#5aa9e6", width: 2, spanGaps: true, points: {show: true, size: 6}},
      ],
      cursor: {drag: {x: true, y: false}, bind: {dblclick: () => null}},
      hooks: {setSelect: [onSelect]},
    };
    plot = new uPlot(opts, joined(full), box);
    plot.over.addEventListener("dblclick", resetZoom);
    window.addEventListener("resize", () => plot.setSize({width: Math.max(300, box.clientWidth), height: 320}));
  }
  let lastDraw = 0;
  function redraw() {
    if (redrawQueued) return;
    redrawQueued = true;
    const wait = Math.max(0, lastDraw + CHART_MIN_REDRAW_MS - Date.now());
    setTimeout(() => requestAnimationFrame(() => {
      redrawQueued = false;
      lastDraw = Date.now();
      if (!plot) makePlot();
      else if (!detail) plot.setData(joined(full));
    }), plot ? wait : 0);
  }
  async function onSelect(u) {
    if (u.select.width < 5) return;
    const min = Math.floor(u.posToVal(u.select.left, "x"));
    const max = Math.ceil(u.posToVal(u.select.left + u.select.width, "x"));
    $("reset-zoom").classList.remove("hidden");
    if (full.bucket <= 1) { detail = {train: full.train, eval: full.eval, min, max}; return; }
    const h = await apiGet("/api/history?max_points=" + HISTORY_POINTS + "&from_step=" + Math.max(0, min) + "&to_step=" + Math.max(0, max));
    detail = {train: [h.train.global_step, h.train.loss], eval: [h.eval.global_step, h.eval.eval_loss], min, max};
    plot.setData(joined(detail), false);
    plot.setScale("x", {min, max});
    setText("chart-note", "zoomed: steps " + fmt.num(min) + "–" + fmt.num(max) + ", " + h.bucket_steps + " step(s) per point");
  }
  function resetZoom() {
    detail = null;
    $("reset-zoom").classList.add("hidden");
    noteBuckets();
    if (plot) plot.setData(joined(full), true);
  }
  $("reset-zoom").addEventListener("click", resetZoom);
  function noteBuckets() {
    setText("chart-note", full.train[0].length ? (full.bucket > 1 ? full.bucket + " steps per point" : "every step") : "no steps yet");
  }

  async function loadHistory() {
    const h = await apiGet("/api/history?max_points=" + HISTORY_POINTS);
    full.train = [h.train.global_step, h.train.loss];
    full.eval = [h.eval.global_step, h.eval.eval_loss];
    full.bucket = h.bucket_steps;
    detail = null;
    $("reset-zoom").classList.add("hidden");
    noteBuckets();
    if (plot) plot.setData(joined(full), true); else redraw();
  }
  function appendPoint(series, x, y) {
    const xs = series[0];
    if (xs.length && x <= xs[xs.length - 1]) return;  // already covered by the loaded history
    xs.push(x); series[1].push(y);
  }

  // ---- battle log ----------------------------------------------------------------------------
  const seenEvents = new Set();
  function logItem(e) {
    return el("li", {class: e.level, dataset: {id: String(e.id)}},
      el("span", {class: "when"}, fmt.time(e.time)), el("span", {class: "badge"}, e.kind), " ",
      el("span", {class: "msg"}, e.message));
  }
  function addEvent(e) {
    if (seenEvents.has(e.id)) return;
    seenEvents.add(e.id);
    const log = $("battle-log");
    log.insertBefore(logItem(e), log.firstChild);
    while (log.children.length > MAX_LOG) log.removeChild(log.lastChild);
  }
  async function loadEvents() {
    const r = await apiGet("/api/events?limit=100");
    $("battle-log").replaceChildren();
    seenEvents.clear();
    r.events.forEach(addEvent);
  }

  // ---- wiring ------------------------------------------------------------------------------------
  Tavern.onResync(() => apiGet("/api/status").then(renderStatus));
  Tavern.onResync(loadHistory);
  Tavern.onResync(loadEvents);
  socket.on("status", renderStatus);
  // Steps can arrive many times a second: keep the newest and write it once per animation frame
  // (a hidden tab then does no work until it is shown again).
  let newestStep = null;
  function flushStep() {
    const s = newestStep;
    newestStep = null;
    showStep(s.global_step);
    if (s.learning_rate !== null) setText("learning-rate", fmt.sci(s.learning_rate));
    if (s.loss !== null) setText("loss", fmt.num(s.loss, 4));
  }
  socket.on("step", (s) => {
    if (newestStep === null) requestAnimationFrame(flushStep);
    newestStep = s;
    if (s.loss !== null) {
      appendPoint(full.train, s.global_step, s.loss);
      if (!detail) noteBuckets();
      redraw();
    }
    if (full.train[0].length > 3 * HISTORY_POINTS) loadHistory();  // re-bucket a long live session
  });
  socket.on("eval", (e) => { appendPoint(full.eval, e.global_step, e.eval_loss); redraw(); });
  socket.on("event", addEvent);
  socket.on("command", showCommand);
  socket.on("history_reset", () => {
    shownStep = 0;  // the daemon rolled back to its last checkpoint: the step really went back
    loadHistory();
    apiGet("/api/status").then(renderStatus);
  });
  socket.on("checkpoint", (c) => {
    if (c.action === "added") setText("last-checkpoint", c.name);
  });
})();
