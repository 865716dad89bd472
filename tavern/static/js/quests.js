/* The quests page: the queue by state and priority, live; details (report, first records); actions; upload.
 *
 * Data: GET /api/quests (whole board), GET /api/quests/<id> (details). Refetched at load, after every
 * (re)connect (Tavern.onResync) and, debounced, on every "quest" socket event. Downloads by URL:
 * POST /api/quests/fetch, then GET /api/quests/downloads every second while one is running. Every string from the
 * server is written with Tavern.el / textContent, never as HTML.
 */
(function () {
  "use strict";
  const {el, fmt, toast} = Tavern;
  const PRIORITIES = ["high", "normal", "low"];
  const PRIO_ORDER = {high: 0, normal: 1, low: 2};
  const GROUPS = ["processing", "validating", "queued", "waiting", "failed", "finished", "removed"];
  const REFRESH_DEBOUNCE_MS = 150;
  let selected = null;        // {id, state} of the quest shown in the details panel
  let timer = null;
  let maxUpload = Number(document.getElementById("upload-limit").dataset.bytes);

  function groupOf(q) {
    if (q.state === "queued") return q.waiting_for ? "waiting" : "queued";
    if (q.state === "completed" || q.state === "skipped") return "finished";
    return q.state;
  }

  function sortGroup(key, rows) {
    if (key === "queued" || key === "waiting") {
      rows.sort((a, b) => (a.deferred - b.deferred) || (PRIO_ORDER[a.priority] - PRIO_ORDER[b.priority]) ||
        (a.id - b.id));
    } else if (key === "finished" || key === "removed") {
      rows.sort((a, b) => (b.updated_at - a.updated_at) || (b.id - a.id));
    } else {
      rows.sort((a, b) => a.id - b.id);
    }
    return rows;
  }

  // actions ---------------------------------------------------------------------------------------
  const act = (url, body, done) => Tavern.act(url, body, done, refresh);

  function confirmButton(label, confirmLabel, onConfirm) {
    // Two clicks, no native dialog: the first arms the button for a few seconds.
    const b = el("button", {type: "button", class: "danger small", "data-action": label.toLowerCase()}, label);
    let armed = null;
    b.addEventListener("click", () => {
      if (armed) { clearTimeout(armed); armed = null; b.textContent = label; onConfirm(); return; }
      b.textContent = confirmLabel;
      b.classList.add("armed");
      armed = setTimeout(() => { armed = null; b.textContent = label; b.classList.remove("armed"); }, 4000);
    });
    return b;
  }

  function actionCell(q) {
    const cell = el("td", {class: "actions"});
    if (q.actions.includes("retry")) {
      cell.appendChild(el("button", {type: "button", class: "small", "data-action": "retry",
        onclick: () => act(`/api/quests/${q.id}/retry`, {}, `${q.name} is queued again`)}, "Retry"));
    }
    if (q.actions.includes("restore")) {
      cell.appendChild(el("button", {type: "button", class: "small", "data-action": "restore",
        onclick: () => act(`/api/quests/${q.id}/restore`, {}, `${q.name} is back in the queue`)}, "Restore"));
    }
    if (q.actions.includes("remove")) {
      cell.appendChild(confirmButton("Remove", "Really remove?",
        () => act(`/api/quests/${q.id}/remove`, {}, `${q.name} moved to the trash`)));
    }
    return cell;
  }

  function priorityCell(q) {
    if (!q.actions.includes("priority")) return el("td", {}, q.priority);
    const sel = el("select", {"aria-label": "priority of quest " + q.id, "data-action": "priority"},
      PRIORITIES.map((p) => el("option", {value: p, selected: p === q.priority}, p)));
    sel.addEventListener("change", () =>
      act(`/api/quests/${q.id}/priority`, {priority: sel.value}, `${q.name}: priority ${sel.value}`));
    return el("td", {}, sel);
  }

  function examplesCell(q) {
    const total = q.examples_total;
    const done = q.examples_trained || 0;
    const cell = el("td", {class: "examples"}, `${fmt.num(done)} / ${fmt.num(total)}`);
    if (total) {
      cell.appendChild(el("progress", {max: total, value: Math.min(done, total)}));
    }
    return cell;
  }

  function notesCell(q) {
    const cell = el("td", {class: "notes"});
    if (q.waiting_for) cell.appendChild(el("span", {class: "badge waiting"}, "waiting for " + q.waiting_for));
    if (q.deferred) cell.appendChild(el("span", {class: "badge"}, "skipped by you: after the others"));
    if (q.failure === "validation") cell.appendChild(el("div", {class: "hint"}, "failed validation: fix the file and drop it again"));
    if (q.error) cell.appendChild(el("div", {class: "error-text"}, q.error));
    else if (q.note) cell.appendChild(el("div", {class: "muted"}, q.note));
    return cell;
  }

  function row(q) {
    const name = el("button", {type: "button", class: "linkish qname", title: "show details",
      onclick: () => select(q.id)}, q.name);
    return el("tr", {"data-quest-id": q.id, class: selected && selected.id === q.id ? "selected" : null},
      el("td", {class: "num"}, String(q.id)),
      el("td", {class: "name"}, name),
      el("td", {}, el("span", {class: "badge state-" + q.state}, q.state)),
      priorityCell(q),
      el("td", {}, q.format || "—"),
      el("td", {class: "school", title: q.school_title || ""}, q.school || "—"),
      examplesCell(q),
      el("td", {class: "num"}, fmt.num(q.steps)),
      notesCell(q),
      actionCell(q));
  }

  // board -----------------------------------------------------------------------------------------
  function renderCounts(c) {
    const box = document.getElementById("quest-counts");
    const stat = (label, value, sub) => el("div", {class: "stat", "data-count": label},
      el("div", {class: "label"}, label), el("div", {class: "value"}, fmt.num(value)), sub ? el("div", {class: "sub"}, sub) : null);
    box.replaceChildren(
      stat("validating", c.validating),
      stat("queued", c.queued, `high ${c.queued_high} · normal ${c.queued_normal} · low ${c.queued_low}`),
      stat("waiting", c.waiting, "for a school (DPO)"),
      stat("processing", c.processing),
      stat("completed", c.completed),
      stat("skipped", c.skipped),
      stat("failed", c.failed),
      stat("removed", c.removed));
  }

  function renderInbox(files) {
    const box = document.getElementById("inbox-box");
    box.classList.toggle("hidden", !files.length);
    document.getElementById("inbox-list").replaceChildren(...files.map((f) =>
      el("li", {}, el("span", {class: "mono"}, f.name), " ", el("span", {class: "muted"}, `${f.priority} · ${fmt.bytes(f.size_bytes)}`))));
  }

  function render(data) {
    maxUpload = data.max_upload_bytes;
    renderCounts(data.counts);
    renderInbox(data.inbox);
    const groups = Object.fromEntries(GROUPS.map((g) => [g, []]));
    for (const q of data.quests) (groups[groupOf(q)] || groups.finished).push(q);
    for (const key of GROUPS) {
      const section = document.getElementById("group-" + key);
      const rows = sortGroup(key, groups[key]);
      section.querySelector("tbody").replaceChildren(...rows.map(row));
      section.querySelector(".empty").classList.toggle("hidden", rows.length > 0);
      section.querySelector("table").classList.toggle("hidden", rows.length === 0);
      document.getElementById("count-" + key).textContent = String(rows.length);
    }
    if (selected) {
      const q = data.quests.find((x) => x.id === selected.id);
      if (q && q.state !== selected.state) select(q.id);  // its file moved: reload report and preview
    }
  }

  async function refresh() {
    render(await apiGet("/api/quests"));
  }

  function schedule() {
    if (timer) return;
    timer = setTimeout(() => { timer = null; refresh().catch((e) => toast(e.message, "error")); }, REFRESH_DEBOUNCE_MS);
  }

  // details ---------------------------------------------------------------------------------------
  const SUMMARY_KEYS = ["accepted", "reason", "format", "lines", "records_valid", "records_bad", "records_dropped",
    "bad_line_ratio", "max_bad_line_ratio", "truncated", "max_length", "length_policy", "trainable_token_ratio",
    "content_hash", "note"];

  function show(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function issuesTable(title, items, more) {
    if (!items || !items.length) return null;
    const rows = items.map((it) => typeof it === "object" && it !== null
      ? el("tr", {}, el("td", {class: "num"}, show(it.line)), el("td", {}, show(it.reason)))
      : el("tr", {}, el("td", {}), el("td", {class: "muted"}, show(it))));
    return el("div", {class: "issues"}, el("h4", {}, title),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", {class: "num"}, "line"), el("th", {}, "reason"))),
        el("tbody", {}, rows)),
      more ? el("p", {class: "muted small"}, `${fmt.num(more)} more not listed in the report`) : null);
  }

  function reportBlock(rep) {
    const box = el("div", {class: "report"}, el("h3", {}, "Validation report"));
    if (!rep.report) { box.appendChild(el("p", {class: "muted"}, rep.problem || "no report")); return box; }
    const r = rep.report;
    const summary = el("table", {class: "kv"}, el("tbody", {}, SUMMARY_KEYS.filter((k) => k in r).map((k) =>
      el("tr", {}, el("th", {}, k), el("td", {class: k === "accepted" ? (r[k] ? "ok" : "error-text") : null}, show(r[k]))))));
    box.appendChild(summary);
    if (r.tokens) {
      const t = r.tokens;
      box.appendChild(el("p", {class: "small"}, `tokens: total ${fmt.num(t.total)} (trainable ${fmt.num(t.trainable)}); ` +
        `length min ${t.min} · p50 ${t.p50} · p95 ${t.p95} · p99 ${t.p99} · max ${t.max}`));
    }
    box.appendChild(issuesTable("Bad lines", r.bad_lines, r.bad_lines_truncated) || el("span"));
    box.appendChild(issuesTable("Dropped lines", r.dropped_lines, r.dropped_lines_truncated) || el("span"));
    box.appendChild(el("details", {}, el("summary", {}, "whole report (JSON)"),
      el("pre", {class: "json"}, JSON.stringify(r, null, 2))));
    return box;
  }

  function previewBlock(pv) {
    const box = el("div", {class: "preview"}, el("h3", {}, "First records"));
    if (pv.lines.length) {
      box.appendChild(el("pre", {class: "records", id: "preview-lines"}, pv.lines.map((ln) =>
        el("div", {class: "line"}, el("span", {class: "lineno"}, String(ln.number)), ln.text,
          ln.truncated ? el("span", {class: "muted"}, " … (cut)") : null))));
    }
    if (pv.problem) box.appendChild(el("p", {class: "muted"}, pv.problem));
    else if (!pv.lines.length) box.appendChild(el("p", {class: "muted"}, "the file is empty"));
    return box;
  }

  async function select(id) {
    let d;
    try {
      d = await apiGet(`/api/quests/${id}`);
    } catch (e) {
      toast(e.message, "error");
      return;
    }
    const q = d.quest;
    selected = {id: q.id, state: q.state};
    document.querySelectorAll("tr[data-quest-id]").forEach((tr) =>
      tr.classList.toggle("selected", Number(tr.dataset.questId) === q.id));
    const notices = [];
    if (q.failure === "validation") notices.push(el("p", {class: "notice"},
      "This file failed validation. Retrying would fail the same way: read the report, fix the file and drop it into the inbox again."));
    if (q.failure === "training") notices.push(el("p", {class: "notice"},
      `Training failed after ${q.attempts} attempt(s): ${q.error || "unknown error"}. Retry puts it back in the queue.`));
    if (q.waiting_for) notices.push(el("p", {class: "notice"},
      `Accepted and queued, but not trained until the ${q.waiting_for} school exists.`));
    const body = document.getElementById("detail-body");
    body.replaceChildren(
      el("h3", {class: "detail-name", id: "detail-name"}, q.name),
      el("p", {class: "muted small"}, `quest ${q.id} · ${q.state} · ${q.priority} · ${d.file}`),
      el("p", {class: "small"}, `examples ${fmt.num(q.examples_trained)} / ${fmt.num(q.examples_total)} · steps ${fmt.num(q.steps)}` +
        (q.first_global_step ? ` · global steps ${q.first_global_step}–${q.last_global_step}` : "") +
        ` · ${fmt.bytes(q.size_bytes)} · added ${fmt.datetime(q.created_at)}`),
      ...(q.source_url ? [el("p", {class: "small source", id: "detail-source"}, "downloaded from ",
        el("span", {class: "mono"}, q.source_url), el("br"), el("span", {class: "muted"}, `sha256 ${q.source_sha256}`))] : []),
      ...notices, reportBlock(d.report), previewBlock(d.preview));
    body.classList.remove("hidden");
    document.getElementById("detail-empty").classList.add("hidden");
  }

  // upload ----------------------------------------------------------------------------------------
  document.getElementById("upload-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = document.getElementById("upload-file");
    const file = input.files[0];
    if (!file) { toast("choose a quest file (.jsonl, .json, .csv, .tsv, .parquet, .txt) first", "warning"); return; }
    if (file.size > maxUpload) {
      toast(`${file.name} is ${fmt.bytes(file.size)}, over the upload limit of ${fmt.bytes(maxUpload)}`, "error");
      return;
    }
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("priority", document.getElementById("upload-priority").value);
    const button = document.getElementById("upload-button");
    button.disabled = true;
    try {
      const r = await apiPost("/api/quests/upload", form);
      toast(`uploaded as ${r.path}; the daemon will validate it`, "success");
      input.value = "";
    } catch (e) {
      toast(e.message, "error");
    } finally {
      button.disabled = false;
    }
    await refresh();
  });

  // download by URL -------------------------------------------------------------------------------
  const DOWNLOAD_POLL_MS = 1000;
  let downloadTimer = null;
  let downloadsRunning = false;

  function downloadItem(d) {
    const label = d.name || d.url;
    const item = el("li", {"data-download-id": d.id, "data-state": d.state},
      el("span", {class: "badge state-" + ({done: "completed", failed: "failed"}[d.state] || "processing")}, d.state),
      " ", el("span", {class: "mono"}, label));
    if (d.state === "downloading") {
      item.appendChild(el("div", {class: "muted small"}, d.bytes_total
        ? `${fmt.bytes(d.bytes_done)} of ${fmt.bytes(d.bytes_total)}` : `${fmt.bytes(d.bytes_done)} so far`));
      if (d.bytes_total) item.appendChild(el("progress", {max: d.bytes_total, value: d.bytes_done}));
      else item.appendChild(el("progress", {}));
    } else if (d.state === "done") {
      item.appendChild(el("div", {class: "muted small"}, `${fmt.bytes(d.bytes_done)} · sha256 ${(d.sha256 || "").slice(0, 16)}… · ` +
        (d.quest_id ? `quest ${d.quest_id}` : "in the inbox")));
    } else if (d.error) {
      item.appendChild(el("div", {class: "error-text small"}, d.error));
    }
    if (d.name && d.url !== d.name) item.appendChild(el("div", {class: "muted small"}, d.url));
    return item;
  }

  async function refreshDownloads() {
    let data;
    try {
      data = await apiGet("/api/quests/downloads");
    } catch (e) {
      return;
    }
    const shown = data.downloads.slice(0, 5);
    document.getElementById("downloads-box").classList.toggle("hidden", !shown.length);
    document.getElementById("download-list").replaceChildren(...shown.map(downloadItem));
    const running = data.downloads.some((d) => d.state === "downloading");
    clearTimeout(downloadTimer);
    downloadTimer = running ? setTimeout(refreshDownloads, DOWNLOAD_POLL_MS) : null;
    if (downloadsRunning && !running) schedule();  // a finished download is in the inbox now
    downloadsRunning = running;
  }

  document.getElementById("fetch-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = document.getElementById("fetch-url");
    const url = input.value.trim();
    if (!url) { toast("paste the address of a quest file first", "warning"); return; }
    const button = document.getElementById("fetch-button");
    button.disabled = true;
    try {
      await apiPost("/api/quests/fetch", {url, priority: document.getElementById("fetch-priority").value});
      toast("downloading into the inbox…", "success");
      input.value = "";
    } catch (e) {
      toast(e.message, "error");
    } finally {
      button.disabled = false;
    }
    await refreshDownloads();
  });

  document.getElementById("fetch-limit").textContent = fmt.bytes(Number(document.getElementById("fetch-limit").dataset.bytes));
  document.getElementById("upload-limit").textContent = fmt.bytes(maxUpload);
  socket.on("quest", schedule);
  // Progress of the quest in training changes with every step: refresh at most once a second for it.
  let lastStepRefresh = 0;
  socket.on("step", () => {
    const now = Date.now();
    if (now - lastStepRefresh > 1000) { lastStepRefresh = now; schedule(); }
  });
  Tavern.onResync(refresh);
  Tavern.onResync(refreshDownloads);
  window.QuestsPage = {refresh, select};
})();
