/* The vault page: checkpoints with metrics and tags, pin/unpin, delete by typing the exact name, disk use.
 *
 * Data: GET /api/vault, refetched at load, after every (re)connect and on "checkpoint" / "vault" socket
 * events. Strings are written with Tavern.el / textContent only.
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

  socket.on("checkpoint", schedule);
  socket.on("vault", schedule);
  Tavern.onResync(refresh);
  window.VaultPage = {refresh};
})();
