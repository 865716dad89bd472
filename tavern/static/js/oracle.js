/* The Oracle page: multi-turn chat streamed over Socket.IO, ratings and pairwise choices.
 *
 * Socket.IO: emits "oracle_chat" {model, messages, temperature, top_p, max_new_tokens, client_ref} and
 * "oracle_cancel" {request_id}; listens to "oracle_status", "oracle_token", "oracle_done", "oracle_error"
 * (each carries our client_ref) and to the Tavern's "checkpoint" pushes (refreshes the model list).
 * REST: /api/oracle/models, /api/oracle/ratings, /api/oracle/pairs, /api/oracle/preferences,
 * /api/oracle/feedback (the feedback loop: pairs until the next Judge quest, Judge quests scored).
 * All chat text is written with text nodes (Tavern.el / createTextNode), never as HTML.
 */
(function () {
  "use strict";
  const {el, fmt, toast, onResync} = Tavern;
  const $ = (id) => document.getElementById(id);
  const logEl = $("chat-log"), input = $("chat-input"), modelSel = $("oracle-model");
  const tempEl = $("oracle-temperature"), topPEl = $("oracle-top-p"), maxEl = $("oracle-max-new-tokens");

  let conversation = [];  // user/assistant messages the next turn builds on
  let turns = [];         // {prompt, node, answersNode, answers: [answer], picked}
  let active = null;      // the answer being streamed
  let seq = 0;

  // settings ---------------------------------------------------------------------------------------
  function showSettings() {
    $("temperature-value").textContent = Number(tempEl.value).toFixed(2) + (Number(tempEl.value) === 0 ? " (greedy)" : "");
    $("top-p-value").textContent = Number(topPEl.value).toFixed(2);
  }
  tempEl.addEventListener("input", showSettings);
  topPEl.addEventListener("input", showSettings);
  showSettings();

  function maxNewTokens() {
    const limit = Number(maxEl.dataset.limit) || 512;
    const n = Math.min(limit, Math.max(1, Math.round(Number(maxEl.value) || 128)));
    maxEl.value = n;
    return n;
  }

  async function loadModels() {
    const data = await apiGet("/api/oracle/models");
    const keep = modelSel.value;
    modelSel.replaceChildren(...data.models.map((m) => el("option", {value: m.id},
      m.label + (m.loss !== null && m.loss !== undefined ? " · loss " + fmt.num(m.loss, 3) : ""))));
    if (!data.models.length) modelSel.appendChild(el("option", {value: "hero"}, "live hero (no model yet)"));
    if (keep && data.models.some((m) => m.id === keep)) modelSel.value = keep;
    const w = data.worker;
    $("oracle-worker").textContent = w.running
      ? "inference worker: running (pid " + w.pid + "), " + w.pending + " of " + w.max_pending + " slots busy"
      : "inference worker: starts with the first message (a few seconds), in its own process";
  }

  async function loadPreferences() {
    const data = await apiGet("/api/oracle/preferences?limit=6");
    $("pref-pairs").textContent = fmt.num(data.counts.pair);
    $("pref-up").textContent = fmt.num(data.counts.rating_up);
    $("pref-down").textContent = fmt.num(data.counts.rating_down);
    $("pref-recent").replaceChildren(...data.preferences.map((p) => {
      const mark = p.kind === "pair" ? "picked" : (p.rating > 0 ? "good" : "bad");
      const text = p.kind === "pair" ? p.chosen : (p.chosen || p.rejected);
      return el("li", {}, el("span", {class: "when"}, fmt.time(p.time)),
        el("span", {class: "badge"}, mark), " " + p.checkpoint + ": ",
        el("span", {class: "muted"}, text.length > 80 ? text.slice(0, 80) + "…" : text));
    }));
  }

  function accuracy(v) { return v === null || v === undefined ? "?" : Number(v).toFixed(2); }

  async function loadFeedback() {
    const f = await apiGet("/api/oracle/feedback");
    if (!f.enabled) {
      $("feedback-next").textContent = "The feedback loop is off (feedback.enabled in config.json): choices are only stored.";
    } else {
      const p = f.pairs_until_next, r = f.ratings_until_next;
      $("feedback-next").textContent = (p === 0 ? "a Judge quest of pairs is due now" : p + (p === 1 ? " pair" : " pairs") +
        " until the next Judge quest") + " · " + (r === 0 ? "ratings: due now" : r + (r === 1 ? " rating" : " ratings") +
        " until a KTO one") + " · " + f.held_out_pairs + " pairs held out for scoring";
    }
    $("feedback-quests").replaceChildren(...f.quests.map((q) => el("li", {class: "judge-quest"},
      el("span", {class: "badge"}, "Judge quest #" + q.number), " " + q.name + ": " + q.records + " " +
      (q.kind === "pair" ? "pairs" : "ratings") + (q.accuracy_after !== null
        ? " · preference accuracy " + accuracy(q.accuracy_before) + " → " + accuracy(q.accuracy_after)
        : q.held_out ? " · waiting to train" : ""))));
  }

  onResync(() => Promise.all([loadModels(), loadPreferences(), loadFeedback()]));
  socket.on("event", (e) => {
    if (e && (e.kind === "feedback_quest" || e.kind === "judge_quest_scored")) loadFeedback().catch(() => {});
  });
  socket.on("checkpoint", () => loadModels().catch(() => {}));

  // chat -------------------------------------------------------------------------------------------
  function setBusy(busy) {
    $("chat-send").disabled = busy;
    $("chat-stop").classList.toggle("hidden", !busy);
    $("chat-state").textContent = busy ? "the oracle is answering…" : "";
    $("chat-empty").classList.toggle("hidden", turns.length > 0);
  }

  function systemPrompt() {
    const s = $("oracle-system").value.trim();
    return s ? [{role: "system", content: s}] : [];
  }

  function scrollDown() { logEl.scrollTop = logEl.scrollHeight; }

  function send(ev) {
    if (ev) ev.preventDefault();
    const text = input.value.trim();
    if (!text || active) return;
    input.value = "";
    conversation.push({role: "user", content: text});
    logEl.appendChild(el("li", {class: "msg user"}, el("div", {class: "who"}, "you"), el("div", {class: "text"}, text)));
    const answersNode = el("div", {class: "answers one"});
    const node = el("li", {class: "msg assistant"}, el("div", {class: "who"}, "oracle"), answersNode);
    logEl.appendChild(node);
    const turn = {prompt: systemPrompt().concat(conversation), node, answersNode, answers: [], picked: null};
    turns.forEach((t) => { t.last = false; renderActions(t); });
    turn.last = true;
    turns.push(turn);
    startAnswer(turn);
  }

  function startAnswer(turn) {
    const ref = "c" + (++seq);
    const textNode = el("div", {class: "text streaming"});
    const meta = el("div", {class: "meta"}, "asking " + (modelSel.selectedOptions[0] || {}).textContent + "…");
    const actions = el("div", {class: "actions"});
    const box = el("div", {class: "answer", dataset: {ref}}, meta, textNode, actions);
    const answer = {turn, ref, box, meta, textNode, actions, text: "", status: "streaming", checkpoint: null,
                    requestId: null, rating: 0, ratingId: null};
    turn.answers.push(answer);
    turn.answersNode.className = "answers " + (turn.answers.length > 1 ? "two" : "one");
    turn.answersNode.appendChild(box);
    active = answer;
    setBusy(true);
    renderActions(turn);
    scrollDown();
    socket.emit("oracle_chat", {
      model: modelSel.value || "hero", messages: turn.prompt, temperature: Number(tempEl.value),
      top_p: Number(topPEl.value), max_new_tokens: maxNewTokens(), client_ref: ref,
    }, (ack) => {
      if (ack && ack.ok) answer.requestId = ack.request_id;
      else fail(answer, (ack && ack.error) || "the Tavern did not accept the message");
    });
  }

  function byRef(ref) { return active && active.ref === ref ? active : null; }

  socket.on("oracle_status", (d) => {
    const a = byRef(d.client_ref);
    if (!a) return;
    if (d.status === "starting") a.meta.textContent = "starting the inference worker (a few seconds)…";
    if (d.status === "loading") a.meta.textContent = "loading " + d.checkpoint + "…";
  });
  socket.on("oracle_token", (d) => {
    const a = byRef(d.client_ref);
    if (!a) return;
    if (!a.text) a.meta.textContent = "answering…";
    a.text += d.text;
    a.textNode.appendChild(document.createTextNode(d.text));
    scrollDown();
  });
  socket.on("oracle_done", (d) => {
    const a = byRef(d.client_ref);
    if (!a) return;
    a.checkpoint = d.checkpoint;
    a.meta.textContent = d.checkpoint + " · " + d.completion_tokens + " tokens · " + fmt.num(d.seconds, 2) + " s" +
      (d.finish_reason === "length" ? " · stopped at max new tokens" : "") +
      (d.finish_reason === "cancelled" ? " · stopped by you" : "");
    a.status = a.text ? "done" : "error";
    if (!a.text) a.textNode.appendChild(el("span", {class: "muted"}, "(no text)"));
    finish(a);
  });
  socket.on("oracle_error", (d) => { const a = byRef(d.client_ref); if (a) fail(a, d.error); });

  function fail(answer, message) {
    if (answer.status !== "streaming") return;
    answer.status = "error";
    answer.meta.textContent = "";
    answer.textNode.appendChild(el("div", {class: "error"}, "⚠ " + message));
    finish(answer);
  }

  function finish(answer) {
    answer.textNode.classList.remove("streaming");
    const turn = answer.turn;
    if (turn.answers.length === 1 && answer.status === "done") conversation.push({role: "assistant", content: answer.text});
    if (active === answer) active = null;
    setBusy(false);
    renderActions(turn);
  }

  // ratings and choices --------------------------------------------------------------------------------
  function renderActions(turn) {
    const [a, b] = turn.answers;
    turn.answers.forEach((ans) => {
      const buttons = [];
      if (ans.status === "done" && ans.text.trim() !== "") {
        buttons.push(el("button", {type: "button", class: "rate-up", title: "good answer", "aria-pressed": String(ans.rating > 0),
                                   onclick: () => rate(ans, 1)}, "👍 good"));
        buttons.push(el("button", {type: "button", class: "rate-down", title: "bad answer", "aria-pressed": String(ans.rating < 0),
                                   onclick: () => rate(ans, -1)}, "👎 bad"));
      }
      const bothDone = b && a.status === "done" && b.status === "done";
      // the server refuses a pair of equal or blank answers: no button that cannot work
      const pairable = bothDone && a.text.trim() !== "" && b.text.trim() !== "" && a.text !== b.text;
      if (pairable && turn.picked === null && !active) {
        buttons.push(el("button", {type: "button", class: "pick primary", onclick: () => pick(turn, ans)}, "Keep this one"));
      } else if (bothDone && !pairable && ans === b) {
        buttons.push(el("span", {class: "muted no-pair"}, a.text === b.text ? "same answer twice: no choice to keep"
                                                                           : "an empty answer: no choice to keep"));
      }
      if (turn.last && !active && ans.status === "error") {
        buttons.push(el("button", {type: "button", class: "retry", onclick: () => retry(turn, ans)}, "Retry"));
      }
      if (turn.last && !active && !b && ans.status === "done") {
        buttons.push(el("button", {type: "button", class: "regenerate", title: "a second answer to the same prompt; then keep the better one",
                                   onclick: () => startAnswer(turn)}, "Regenerate"));
      }
      if (turn.picked !== null) buttons.push(el("span", {class: "muted"}, ans === turn.picked ? "kept" : "not kept"));
      ans.actions.replaceChildren(...buttons);
    });
  }

  function retry(turn, answer) {
    answer.box.remove();
    turn.answers = turn.answers.filter((x) => x !== answer);
    startAnswer(turn);
  }

  async function rate(answer, value) {
    try {
      if (answer.rating === value) {
        await apiPost("/api/oracle/preferences/" + answer.ratingId + "/delete", {});
        answer.rating = 0; answer.ratingId = null;
      } else {
        const r = await apiPost("/api/oracle/ratings", {checkpoint: answer.checkpoint, prompt: answer.turn.prompt,
          completion: answer.text, rating: value, replaces: answer.ratingId});
        answer.rating = value; answer.ratingId = r.id;
      }
      renderActions(answer.turn);
      loadPreferences().catch(() => {});
      loadFeedback().catch(() => {});
    } catch (e) { toast("rating not saved: " + e.message, "error"); }
  }

  async function pick(turn, chosen) {
    const rejected = turn.answers.find((x) => x !== chosen);
    try {
      await apiPost("/api/oracle/pairs", {checkpoint: chosen.checkpoint, prompt: turn.prompt, chosen: chosen.text,
                                         rejected: rejected.text});
    } catch (e) { toast("choice not saved: " + e.message, "error"); return; }
    turn.picked = chosen;
    chosen.box.classList.add("chosen");
    rejected.box.classList.add("rejected");
    const lastAssistant = conversation.length - 1;
    if (turn.last && conversation[lastAssistant] && conversation[lastAssistant].role === "assistant") {
      conversation[lastAssistant] = {role: "assistant", content: chosen.text};
    } else if (turn.last) {
      conversation.push({role: "assistant", content: chosen.text});
    }
    renderActions(turn);
    loadPreferences().catch(() => {});
    loadFeedback().catch(() => {});
  }

  // controls -------------------------------------------------------------------------------------------
  $("chat-form").addEventListener("submit", send);
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) send(ev);
  });
  $("chat-stop").addEventListener("click", () => {
    if (active && active.requestId) socket.emit("oracle_cancel", {request_id: active.requestId});
  });
  $("chat-new").addEventListener("click", () => {
    if (active && active.requestId) socket.emit("oracle_cancel", {request_id: active.requestId});
    active = null; conversation = []; turns = [];
    logEl.replaceChildren();
    setBusy(false);
  });
  socket.on("disconnect", () => { if (active) fail(active, "connection to the Tavern lost; send again"); });
})();
