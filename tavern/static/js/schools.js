/* Schools: the six schools (icon, motto, available or not, quests and steps trained) from /api/schools, and a
 * chart of one school's step metric (/api/schools/metrics). Refetched at load, after a reconnect
 * (Tavern.onResync) and when a quest completes (pushed "event"); the chart also every 3 s while steps arrive. All data is written as text (Tavern.el). */
(function () {
  "use strict";
  const {el, fmt, onResync} = Tavern;
  const $ = (id) => document.getElementById(id);
  const schoolSel = $("chart-school"), metricSel = $("chart-metric"), box = $("school-chart");
  let view = null, plot = null;

  function card(s) {
    return el("section", {class: "card school" + (s.available ? "" : " unavailable"), dataset: {school: s.title}},
      el("div", {class: "row"},
        el("span", {class: "school-icon", "aria-hidden": "true"}, s.icon),
        el("h2", {}, s.title),
        el("span", {class: "badge school-state"}, s.available ? "open" : "not yet built")),
      el("p", {class: "school-motto"}, "“" + s.motto + "”"),
      el("p", {class: "muted small"}, s.what + " · trains quests of school " + s.schools.join(" / ")),
      el("div", {class: "stats"},
        el("div", {class: "stat"}, el("div", {class: "label"}, "quests"), el("div", {class: "value school-quests"}, fmt.num(s.quests))),
        el("div", {class: "stat"}, el("div", {class: "label"}, "steps (= XP)"), el("div", {class: "value school-steps"}, fmt.num(s.steps)))));
  }

  function fillSelectors() {
    const withMetrics = view.schools.filter((s) => s.metrics.length);
    $("chart-empty").classList.toggle("hidden", withMetrics.length > 0);
    const keep = schoolSel.value;
    schoolSel.replaceChildren(...withMetrics.map((s) => el("option", {value: s.title}, s.icon + " " + s.title)));
    if (withMetrics.some((s) => s.title === keep)) schoolSel.value = keep;
    fillMetrics();
  }

  function fillMetrics() {
    const s = view.schools.find((x) => x.title === schoolSel.value);
    const keep = metricSel.value;
    metricSel.replaceChildren(...(s ? s.metrics : []).map((m) => el("option", {value: m}, m)));
    if (s && s.metrics.includes(keep)) metricSel.value = keep;
    else if (s && s.metrics.includes("rewards/margins")) metricSel.value = "rewards/margins";
  }

  async function drawChart() {
    if (!schoolSel.value || !metricSel.value) { box.replaceChildren(); plot = null; return; }
    const url = "/api/schools/metrics?school=" + encodeURIComponent(schoolSel.value) + "&name=" + encodeURIComponent(metricSel.value);
    const data = await apiGet(url);
    const series = [data.points.map((p) => p[0]), data.points.map((p) => p[1])];
    if (plot) plot.destroy();
    box.replaceChildren();
    plot = new uPlot({
      width: Math.max(300, box.clientWidth || 600), height: 260, scales: {x: {time: false}},
      axes: [
        {label: "global_step", stroke: "#a89a86", grid: {stroke: "#3a3029"}, ticks: {stroke: "#3a3029"}},
        {label: data.name, stroke: "#a89a86", grid: {stroke: "#3a3029"}, ticks: {stroke: "#3a3029"}},
      ],
      series: [{label: "step"}, {label: data.school + ": " + data.name, stroke: "#e3b341", width: 2}],
    }, series, box);
    box.dataset.points = String(data.points.length);
  }

  async function load() {
    view = await apiGet("/api/schools");
    $("schools-total").textContent = fmt.num(view.total_steps);
    $("schools").replaceChildren(...view.schools.map(card));
    fillSelectors();
    await drawChart();
  }

  schoolSel.addEventListener("change", () => { fillMetrics(); drawChart().catch(() => {}); });
  metricSel.addEventListener("change", () => drawChart().catch(() => {}));
  onResync(load);
  socket.on("event", (e) => { if (e && e.kind === "quest_completed") load().catch(() => {}); });
  let lastRedraw = 0;  // new steps of the charted school: redraw at most every 3 s
  socket.on("step", () => {
    if (Date.now() - lastRedraw < 3000) return;
    lastRedraw = Date.now();
    drawChart().catch(() => {});
  });
})();
