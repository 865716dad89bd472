/* The vault page: checkpoints with metrics and tags, pin/unpin, delete by typing the exact name, disk use,
 * and exports (hf / gguf / ollama) run in the background with their progress, result path or error.
 *
 * Data: GET /api/vault, refetched at load, after every (re)connect and on "checkpoint" / "vault" socket
 * events; GET /api/vault/exports at load and after every (re)connect, then "export" socket events (one per
 * job change). Strings are written with Tavern.el / textContent only.
 */
(function () {
  "use strict";
  const {el, fmt, toast} = Tavern;
  const PROTECTED = {latest: "latest: training resumes here", best: "best: lowest validation loss",
    pinned: "pinned: unpin it first"};
  let deleting = null;
  let timer = null;

  function loss(x) { return x === null || x === undefined ? "—" : fmt.num(x, 4); }

  function actions(c) {
    const cell = el("td", {class: "actions"});
    const pinned = c.tags.includes("pinned");
    cell.appendChild(el("button", {type: "button", class: "small", "data-action": pinned ? "unpin" : "pin",
      onclick: () => post(`/api/vault/checkpoints/${c.name}/${pinned ? "unpin" : "pin"}`, {},
        `${c.name} ${pinned ? "unpinned" : "pinned"}`)}, pinned ? "Unpin" : "Pin"));
    cell.appendChild(el("button", {type: "button", class: "small", "data-action": "export",
      onclick: () => askExport(c.name)}, "Export…"));
    const guard = c.tags.find((t) => PROTECTED[t]);
    if (guard) {
      cell.appendChild(el("span", {class: "muted small protected", title: PROTECTED[guard]}, " protected (" + guard + ")"));
    } else {
      cell.appendChild(el("button", {type: "button", class: "small danger", "data-action": "delete",
        onclick: () => askDelete(c.name)}, "Delete…"));
    }
    return cell;
  }

  function row(c) {
    return el("tr", {"data-checkpoint": c.name},
      el("td", {class: "mono"}, c.name),
      el("td", {class: "num"}, fmt.num(c.step)),
      el("td", {class: "when"}, fmt.datetime(c.time)),
      el("td", {class: "num"}, loss(c.loss)),
      el("td", {class: "num"}, loss(c.eval_loss)),
      el("td", {class: "num"}, fmt.bytes(c.size_bytes),
        c.adapter ? el("div", {class: "muted small", "data-adapter": c.adapter,
          title: "an adapter checkpoint holds the adapter weights only; the base model stays where it is"},
          `${c.adapter} adapter` + (c.full_size_bytes ? `; full ≈ ${fmt.bytes(c.full_size_bytes)}` : "")) : null),
      el("td", {class: "tags"}, c.tags.map((t) => el("span", {class: "badge tag-" + t}, t)),
        c.problem ? el("div", {class: "error-text small"}, c.problem) : null),
      actions(c));
  }

  function renderDisk(d) {
    document.getElementById("disk-vault").textContent = fmt.bytes(d.vault_bytes);
    document.getElementById("disk-free").textContent = fmt.bytes(d.free_bytes);
    document.getElementById("disk-total").textContent = "of " + fmt.bytes(d.total_bytes);
    const used = d.total_bytes ? 100 * (d.total_bytes - d.free_bytes) / d.total_bytes : 0;
    const bar = document.getElementById("disk-used-bar");
    bar.style.width = used.toFixed(1) + "%";
    bar.parentElement.classList.toggle("warn", used > 90);
    document.getElementById("disk-used-text").textContent = `${used.toFixed(1)}% of the disk in use`;
  }

  function render(data) {
    document.getElementById("vault-hero").textContent = data.hero;
    document.getElementById("vault-count").textContent = String(data.checkpoints.length);
    document.querySelector("#vault-table tbody").replaceChildren(...data.checkpoints.map(row));
    document.getElementById("vault-table").classList.toggle("hidden", !data.checkpoints.length);
    document.getElementById("vault-empty").classList.toggle("hidden", data.checkpoints.length > 0);
    renderDisk(data.disk);
    if (deleting && !data.checkpoints.some((c) => c.name === deleting)) closeDelete();
  }

  async function refresh() { render(await apiGet("/api/vault")); }

  function schedule() {
    if (timer) return;
    timer = setTimeout(() => { timer = null; refresh().catch((e) => toast(e.message, "error")); }, 150);
  }

  const post = (url, body, done) => Tavern.act(url, body, done, refresh);

  // deletion: the user types the exact name; the server checks it again --------------------------------
  const card = document.getElementById("delete-card");
  const input = document.getElementById("delete-confirm");
  const button = document.getElementById("delete-button");

  function askDelete(name) {
    deleting = name;
    document.getElementById("delete-name").textContent = name;
    input.value = "";
    input.placeholder = name;
    button.disabled = true;
    card.classList.remove("hidden");
    input.focus();
  }

  function closeDelete() {
    deleting = null;
    card.classList.add("hidden");
    input.value = "";
  }

  input.addEventListener("input", () => { button.disabled = input.value !== deleting; });
  document.getElementById("delete-cancel").addEventListener("click", closeDelete);
  document.getElementById("delete-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!deleting || input.value !== deleting) return;
    const name = deleting;
    button.disabled = true;
    try {
      const r = await apiPost(`/api/vault/checkpoints/${name}/delete`, {confirm: input.value});
      toast(`${name} deleted, ${fmt.bytes(r.size_bytes)} freed`, "success");
      closeDelete();
    } catch (e) {
      toast(e.message, "error");
      button.disabled = input.value !== deleting;
    }
    await refresh();
  });

  // exports: a background job per request, progress pushed as "export" events -------------------------
  const exportCard = document.getElementById("export-card");
  const formatSelect = document.getElementById("export-format");
  const quantSelect = document.getElementById("export-quantization");
  const exportButton = document.getElementById("export-button");
  const jobs = new Map();
  let exporting = null;
  let options = null;

  function fillOptions(data) {
    if (options) return;
    options = data;
    formatSelect.replaceChildren(...data.formats.map((f) => el("option", {value: f}, f)));
    quantSelect.replaceChildren(...data.quantizations.map((q) =>
      el("option", {value: q, selected: q === data.default_quantization}, q)));
    syncQuant();
  }

  function syncQuant() { quantSelect.disabled = formatSelect.value === "hf"; }

  function askExport(name) {
    exporting = name;
    document.getElementById("export-name").textContent = name;
    exportCard.classList.remove("hidden");
    formatSelect.focus();
  }

  function jobTitle(j) {
    return `${j.checkpoint} → ${j.format}${j.quantization ? " (" + j.quantization + ")" : ""}`;
  }

  function jobItem(j) {
    const li = el("li", {class: "export-job", "data-job": j.id, "data-state": j.state},
      el("div", {}, el("b", {class: "mono"}, jobTitle(j)), " ",
        el("span", {class: "badge state-" + ({running: "processing", done: "completed", failed: "failed"}[j.state])},
          j.state)));
    if (j.state === "running") {
      const bar = el("div", {class: "bar", title: "export progress"}, el("span", {}));
      bar.firstChild.style.width = (100 * (j.progress || 0)).toFixed(0) + "%";
      li.append(bar, el("div", {class: "muted small"}, `${Math.round(100 * (j.progress || 0))}% ${j.message || ""}`));
    } else if (j.state === "done") {
      li.append(el("div", {class: "small"}, "written: ", el("span", {class: "mono path"}, j.path)));
      if (j.format === "ollama") {
        li.append(el("div", {class: "small"}, "import: ",
          el("span", {class: "mono path"}, `ollama create ${hero()} -f ${j.path}`), " (in the realm folder)"));
      }
    } else {
      li.append(el("div", {class: "error-text small"}, j.error || "the export failed"));
    }
    return li;
  }

  function hero() { return document.getElementById("vault-hero").textContent || "hero"; }

  function renderJobs() {
    const list = [...jobs.values()].sort((a, b) => b.started_at - a.started_at);
    document.getElementById("export-jobs").replaceChildren(...list.map(jobItem));
    const running = list.some((j) => j.state === "running");
    exportButton.disabled = running;
    exportButton.title = running ? "an export is running" : "";
  }

  function renderExports(list) {
    const rows = list.map((x) => el("tr", {"data-export": x.name},
      el("td", {class: "mono"}, x.name),
      el("td", {class: "num"}, fmt.bytes(x.bytes)),
      el("td", {class: "when"}, x.created_at ? fmt.datetime(x.created_at) : "—")));
    document.querySelector("#exports-table tbody").replaceChildren(...rows);
    document.getElementById("exports-table").classList.toggle("hidden", !list.length);
    document.getElementById("exports-empty").classList.toggle("hidden", list.length > 0);
  }

  async function refreshExports() {
    const data = await apiGet("/api/vault/exports");
    fillOptions(data);
    jobs.clear();
    data.jobs.forEach((j) => jobs.set(j.id, j));
    renderJobs();
    renderExports(data.exports);
  }

  formatSelect.addEventListener("change", syncQuant);
  document.getElementById("export-cancel").addEventListener("click", () => {
    exporting = null;
    exportCard.classList.add("hidden");
  });
  document.getElementById("export-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!exporting) return;
    const body = {format: formatSelect.value, quantization: formatSelect.value === "hf" ? null : quantSelect.value};
    exportButton.disabled = true;
    const job = await Tavern.act(`/api/vault/checkpoints/${exporting}/export`, body,
      `exporting ${exporting} as ${body.format}${body.quantization ? " (" + body.quantization + ")" : ""}`);
    if (job) jobs.set(job.id, job);
    renderJobs();
  });
  socket.on("export", (job) => {
    const before = jobs.get(job.id);
    jobs.set(job.id, job);
    renderJobs();
    if (job.state !== "running" && (!before || before.state === "running")) {
      if (job.state === "done") toast(`export written: ${job.path}`, "success");
      else toast(`export failed: ${job.error}`, "error");
      refreshExports().catch((e) => toast(e.message, "error"));
    }
  });
  Tavern.onResync(() => refreshExports().catch((e) => toast(e.message, "error")));

  socket.on("checkpoint", schedule);
  socket.on("vault", schedule);
  Tavern.onResync(refresh);
  window.VaultPage = {refresh, refreshExports};
})();
