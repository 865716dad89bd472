/* System: GPUs (NVML), CPU, RAM, disk, our processes; refreshed from /api/system every 2 s. */
(function () {
  "use strict";
  const {el, fmt} = Tavern;
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = 2000;
  const pct = (x) => (x === null || x === undefined) ? "—" : Number(x).toFixed(0) + "%";
  const bar = (id, p) => { $(id).style.width = Math.max(0, Math.min(100, p || 0)) + "%"; };

  function render(s) {
    const g = s.gpu;
    $("no-gpu").classList.toggle("hidden", g.available);
    $("gpu-table").classList.toggle("hidden", !g.available);
    if (!g.available) $("no-gpu").textContent = g.reason;
    $("gpu-table").querySelector("tbody").replaceChildren(...g.gpus.map((d) => el("tr", {},
      el("td", {}, d.index), el("td", {}, d.name), el("td", {class: "num"}, pct(d.utilization_percent)),
      el("td", {class: "num"}, fmt.bytes(d.memory_used_bytes) + " / " + fmt.bytes(d.memory_total_bytes)),
      el("td", {class: "num"}, d.temperature_c === null ? "—" : d.temperature_c + " °C"),
      el("td", {class: "num"}, (d.power_w === null ? "—" : d.power_w.toFixed(0) + " W") + " / "
        + (d.power_limit_w === null ? "—" : d.power_limit_w.toFixed(0) + " W")))));
    $("gpu-driver").textContent = g.driver_version ? "NVIDIA driver " + g.driver_version : "";
    renderTrainingMemory(s.training_memory);
    $("cpu-percent").textContent = pct(s.cpu.percent);
    $("cpu-count").textContent = s.cpu.count + " logical cores";
    $("load-average").textContent = s.cpu.load_average ? s.cpu.load_average.map((x) => x.toFixed(2)).join(" / ") : "—";
    $("per-cpu").replaceChildren(...s.cpu.per_cpu_percent.map((p, i) => {
      const b = el("div", {class: "bar", title: "core " + i + ": " + pct(p)}, el("span"));
      b.firstChild.style.width = p + "%";
      return el("div", {class: "row"}, el("span", {class: "muted mono"}, "cpu" + i), b, el("span", {class: "mono"}, pct(p)));
    }));
    $("ram-used").textContent = fmt.bytes(s.memory.used_bytes);
    $("ram-total").textContent = "of " + fmt.bytes(s.memory.total_bytes) + " (" + pct(s.memory.percent) + "), "
      + fmt.bytes(s.memory.available_bytes) + " available";
    bar("ram-bar", s.memory.percent);
    $("swap-used").textContent = fmt.bytes(s.swap.used_bytes);
    $("swap-total").textContent = "of " + fmt.bytes(s.swap.total_bytes);
    $("disk-free").textContent = fmt.bytes(s.disk.free_bytes);
    $("disk-total").textContent = "of " + fmt.bytes(s.disk.total_bytes) + " (" + pct(s.disk.percent) + " used)";
    bar("disk-bar", s.disk.percent);
    $("disk-path").textContent = s.disk.path;
    $("proc-table").querySelector("tbody").replaceChildren(...s.processes.map((p) => el("tr", {},
      el("td", {}, p.role), el("td", {class: "num"}, p.pid), el("td", {class: "num"}, pct(p.cpu_percent)),
      el("td", {class: "num"}, fmt.bytes(p.rss_bytes)), el("td", {class: "num"}, p.threads))));
    $("updated").textContent = "Last update " + fmt.time(s.time) + ".";
  }

  function renderTrainingMemory(m) {
    if (!m) return;
    if (m.error) {
      $("tm-total").textContent = "—";
      $("tm-lines").textContent = "No estimate: " + m.error;
      return;
    }
    const e = m.estimate;
    $("tm-total").textContent = fmt.bytes(e.total_bytes);
    $("tm-mode").textContent = (e.adapter || "full fine-tuning") + ", " + (m.device === "cuda" ? "GPU" : "CPU")
      + ", gradient checkpointing " + (e.gradient_checkpointing ? "on" : "off");
    $("tm-free").textContent = fmt.bytes(m.free_bytes);
    $("tm-fits").textContent = m.fits ? "fits" : "does not fit: see the advice in the doctor";
    $("tm-fits").classList.toggle("error-text", !m.fits);
    $("tm-lines").textContent = m.lines.join("\n");
  }

  async function refresh() {
    try { render(await apiGet("/api/system")); } catch (e) { $("updated").textContent = "Update failed: " + e.message; }
  }
  Tavern.onResync(refresh);
  setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
})();
