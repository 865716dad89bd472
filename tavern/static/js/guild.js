/* Guild: the hero's skills, their levels, promotion trials (accuracy chart, last trial's answers), the
 * steps until the next trial. State comes from /api/guild at load and after every reconnect
 * (Tavern.onResync); a pushed trial, promotion, generated quest or checkpoint refetches it (no reload).
 * All data is written with textContent (Tavern.el). */
(function () {
  "use strict";
  const {el, fmt} = Tavern;
  const $ = (id) => document.getElementById(id);
  const REFRESH_KINDS = new Set(["trial", "promotion", "quest_generated", "trial_failed", "quest_completed", "spar", "campaign_stage", "campaign_finished"]);
  const STEP_REFRESH_MS = 3000;  // steps move "steps until the next trial": refetch at most this often
  const plots = {};

  function pct(x) { return x === null || x === undefined ? "—" : (100 * x).toFixed(1) + "%"; }

  function chartData(history) {
    return [history.map((t) => t.global_step), history.map((t) => t.accuracy),
      history.map((t) => t.lower_bound), history.map((t) => t.threshold)];
  }
  function drawChart(name, box, history) {
    const data = chartData(history);
    if (plots[name] && plots[name].root.isConnected) { plots[name].setData(data); return; }
    plots[name] = new uPlot({
      width: Math.max(300, box.clientWidth || 600), height: 200,
      scales: {x: {time: false}, y: {range: [0, 1]}},
      axes: [
        {label: "global_step", stroke: "#a89a86", grid: {stroke: "#3a3029"}, ticks: {stroke: "#3a3029"}},
        {label: "accuracy", stroke: "#a89a86", grid: {stroke: "#3a3029"}, ticks: {stroke: "#3a3029"}},
      ],
      series: [
        {label: "step"},
        {label: "accuracy", stroke: "#e3b341", width: 2, points: {show: true, size: 6}},
        {label: "Wilson lower bound", stroke: "#5aa9e6", width: 1.5, points: {show: true, size: 4}},
        {label: "threshold", stroke: "#8a6d5a", width: 1, dash: [4, 4], points: {show: false}},
      ],
    }, data, box);
  }

  function sampleRow(s) {
    return el("tr", {class: s.correct ? "right" : "wrong"},
      el("td", {class: "mono"}, s.prompt), el("td", {class: "mono"}, s.expected),
      el("td", {class: "mono"}, s.answer), el("td", {}, s.correct ? "✔ right" : "✘ wrong"));
  }

  function nextTrial(s) {
    return s.mastered ? "mastered: no trial due"
      : (s.steps_until_trial === null ? "trials on demand only (skills.trial_every_steps is 0)"
        : (s.steps_until_trial === 0 ? "due at the next checkpoint"
          : fmt.num(s.steps_until_trial) + " steps of training on it"));
  }
  function sinceTrial(s) { return " (" + fmt.num(s.steps_since_trial) + " steps since the last)"; }

  function skillCard(s) {
    const last = s.last_trial;
    const chartBox = el("div", {class: "chart guild-chart", id: "chart-" + s.name});
    const card = el("section", {class: "card skill", dataset: {skill: s.name}},
      el("div", {class: "row"},
        el("h2", {}, s.name),
        el("span", {class: "badge skill-level", title: "level: passed in promotion trials"},
          "Lv " + s.level + (s.max_level !== null ? " / " + (s.max_level + 1) : "")),
        el("span", {class: "muted"}, "priority " + s.priority + " · " + s.trials + " trial(s)")),
      el("p", {class: "muted"}, "Next trial: ", el("b", {class: "next-trial"}, nextTrial(s)),
        el("span", {class: "since-trial"}, sinceTrial(s))),
      last ? el("p", {class: "last-trial"}, "Last trial at step " + fmt.num(last.global_step) + ", level "
        + last.level + ": " + last.correct + "/" + last.n + " right (" + pct(last.accuracy)
        + "), lower bound " + fmt.num(last.lower_bound, 3) + " vs " + last.threshold + " — "
        + (last.promoted ? "promoted to level " + last.level_after : "stays at level " + last.level_after))
        : el("p", {class: "muted last-trial"}, "No trial yet."),
      s.history.length ? chartBox : null,
      last && last.samples.length ? el("table", {class: "samples"},
        el("thead", {}, el("tr", {}, el("th", {}, "prompt"), el("th", {}, "expected"), el("th", {}, "answer"),
          el("th", {}, ""))),
        el("tbody", {}, last.samples.map(sampleRow))) : null);
    return {card, chartBox};
  }

  function logItem(e) {
    return el("li", {class: e.level, dataset: {id: String(e.id)}},
      el("span", {class: "when"}, fmt.time(e.time)), el("span", {class: "badge"}, e.kind), " ",
      el("span", {class: "msg"}, e.message));
  }

  // What changes the cards (a trial, a new skill, the log); steps alone only move the "next trial" lines,
  // which are updated in place so a reader's page does not redraw under them.
  let shape = null;
  function shapeOf(g) {
    return JSON.stringify([g.hero, g.total_level, g.promotion_threshold, g.trial_every_steps, g.campaign,
      g.skills.map((s) => [s.name, s.level, s.trials, s.last_trial && s.last_trial.id, s.priority]),
      g.log.map((e) => e.id)]);
  }
  function render(g) {
    const next = shapeOf(g);
    if (next === shape) {
      g.skills.forEach((s) => {
        const card = document.querySelector('[data-skill="' + CSS.escape(s.name) + '"]');
        if (!card) return;
        const a = card.querySelector(".next-trial"), b = card.querySelector(".since-trial");
        if (a.textContent !== nextTrial(s)) a.textContent = nextTrial(s);
        if (b.textContent !== sinceTrial(s)) b.textContent = sinceTrial(s);
      });
      return;
    }
    shape = next;
    $("guild-hero-name").textContent = g.hero;
    $("total-level").textContent = "Total Lv " + g.total_level;
    $("promotion-threshold").textContent = String(g.promotion_threshold);
    $("trial-every").textContent = String(g.trial_every_steps);
    $("guild-empty").classList.toggle("hidden", g.skills.length > 0);
    const c = g.campaign;
    $("guild-campaign").classList.toggle("hidden", !c);
    if (c) {
      const until = Object.entries(c.until || {}).map(([k, v]) => k + " " + JSON.stringify(v)).join(", ");
      $("guild-campaign").textContent = c.finished ? "Campaign finished (" + c.stages + " stages)"
        : "Campaign stage " + c.stage + " of " + c.stages + ": " + c.name + " (" + c.school + "; until " + until
          + (c.started_step === null ? "" : "; since step " + c.started_step) + ")";
    }
    const box = $("skills");
    const built = g.skills.map(skillCard);
    box.replaceChildren(...built.map((b) => b.card));
    g.skills.forEach((s, i) => { if (s.history.length) drawChart(s.name, built[i].chartBox, s.history); });
    $("guild-log").replaceChildren(...g.log.map(logItem));
  }

  let loading = null;
  let again = false;
  async function load() {
    if (loading) { again = true; return loading; }
    loading = (async () => {
      try { render(await apiGet("/api/guild")); } finally {
        loading = null;
        if (again) { again = false; load(); }
      }
    })();
    return loading;
  }
  let lastStepRefresh = 0;
  Tavern.onResync(load);
  socket.on("event", (e) => { if (REFRESH_KINDS.has(e.kind)) load(); });
  socket.on("checkpoint", load);
  socket.on("step", () => {
    if (Date.now() - lastStepRefresh < STEP_REFRESH_MS) return;
    lastStepRefresh = Date.now();
    load();
  });
})();
