"""Bench: Tavern push latency (step row → browser) and training tokens/s with 0 and N browsers watching.

Part 1, latency: the real Tavern server on a tmp realm, K headless Chromium pages on Home; a writer commits
one ``steps`` row every ``--interval`` s through its own ledger connection (as the daemon does). Each page
records ``Date.now() - row.time`` when its ``step`` event arrives (same machine clock). Reported per K:
p50/p95/max in milliseconds over all pages and steps, and the server's share (commit → emit).

Part 2, cost to training: the real daemon (``python -m training daemon``) trains ../shared/models/stories260K
on GSM8K lines, watched by N raw Socket.IO clients (the Tavern's own cost) and then by N Chromium pages
(which also render on this machine); tokens/s is the median of its per-step ``tokens_per_second`` over alternating windows with
0 and N pages (0, N, 0, N, 0), and the medians of the two kinds of window are compared. The CPU used by the
Tavern (this process) and by Chromium in each window is reported beside it. Browsers run on the same machine as training here, so this counts their rendering too (an upper
bound of the cost; a browser on another machine costs the trainer only the Tavern's share).

    .venv/bin/python bench/tavern_push.py [--clients 20] [--steps 150] [--window-seconds 25]

Writes bench/out/tavern_push.json and prints it. Needs /usr/bin/chromium; part 2 needs ../shared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.ledger import Ledger  # noqa: E402
from core.realm import init_realm  # noqa: E402
from tavern.app import close_app  # noqa: E402
from tavern.server import make_tavern_server  # noqa: E402

logging.getLogger("werkzeug").setLevel(logging.WARNING)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
STORIES260K = ROOT.parent / "shared" / "models" / "stories260K"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"
COLLECT = "() => { window.__lat = []; socket.on('step', s => window.__lat.push(Date.now() - s.time * 1000)); }"


class Server:
    def __init__(self, realm):
        self.server, self.app = make_tavern_server(realm, host="127.0.0.1", port=0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        close_app(self.app)


class SocketIOClient:
    """A minimal Socket.IO client over a raw WebSocket (Engine.IO v4 frames, simple-websocket): connects to
    the default namespace, answers pings and JSON-decodes every event, as a page would before rendering.
    It costs the Tavern what a browser costs it, without the browser's rendering on this machine."""

    def __init__(self, url: str):
        import simple_websocket

        self.ws = simple_websocket.Client.connect(url.replace("http://", "ws://", 1)
                                                  + "socket.io/?EIO=4&transport=websocket")
        opening = self.ws.receive(timeout=60)  # generous: the machine may be saturated by training
        if not opening or not opening.startswith("0"):
            raise RuntimeError(f"unexpected Engine.IO opening {opening!r}")
        self.ws.send("40")
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.ws.receive(timeout=0.5)
            except Exception:  # closed by the server or by close()
                return
            if msg == "2":
                self.ws.send("3")
            elif isinstance(msg, str) and msg.startswith("42"):
                json.loads(msg[2:])
                self.events += 1

    def close(self) -> None:
        self._stop.set()
        self.ws.close()
        self._thread.join(2)


def open_clients(kind: str, browser, url: str, n: int) -> list:
    """n watchers of Home: Chromium pages ("browser") or raw Socket.IO clients ("socketio")."""
    if kind == "browser":
        return open_pages(browser, url, n)
    return [SocketIOClient(url) for _ in range(n)]


def open_pages(browser, url: str, n: int) -> list:
    pages = []
    for _ in range(n):
        page = browser.new_page()
        page.goto(url)
        pages.append(page)
    deadline = time.monotonic() + 60
    for page in pages:
        while page.get_attribute("#conn", "data-state") != "live":
            if time.monotonic() > deadline:
                raise RuntimeError("pages did not connect")
            time.sleep(0.05)
        page.evaluate(COLLECT)
    return pages


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def latency(browser, clients: int, steps: int, interval: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        realm = init_realm(Path(tmp) / "realm")
        server = Server(realm)
        ledger = Ledger(realm.ledger_path)
        poller = server.app.extensions["tavern_push"]
        emitted: list[float] = []  # commit → emit, the server's share of the latency (ms)
        original_emit = poller._emit

        def timed_emit(event, payload):
            if event == "step":
                emitted.append(time.time() * 1000 - payload["time"] * 1000)
            original_emit(event, payload)

        poller._emit = timed_emit
        try:
            pages = open_pages(browser, server.url, clients)
            for s in range(1, steps + 1):
                ledger.record_step(global_step=s, quest_id=None, loss=2.0, learning_rate=1e-3, grad_norm=0.5,
                                   tokens=512, tokens_per_second=1000.0, example_start=0, example_end=s,
                                   example_lines=[], quest_steps=s)
                time.sleep(interval)
            time.sleep(1.0)
            samples = list(itertools.chain.from_iterable(p.evaluate("() => window.__lat") for p in pages))
            for p in pages:
                p.close()
        finally:
            ledger.close()
            server.close()
    expected = clients * steps
    return {"clients": clients, "steps": steps, "received": len(samples), "expected": expected,
            "p50_ms": round(percentile(samples, 0.5), 1), "p95_ms": round(percentile(samples, 0.95), 1),
            "max_ms": round(max(samples), 1),
            "server_emit_p50_ms": round(percentile(emitted, 0.5), 1),
            "server_emit_p95_ms": round(percentile(emitted, 0.95), 1)}


def cpu_seconds() -> dict:
    """CPU seconds used so far by this process (the Tavern server + the Playwright driver), and by each
    Chromium process by pid (renderers of closed pages exit: compare pids present at both ends)."""
    import psutil

    me = psutil.Process()
    chromium: dict[int, float] = {}
    for proc in me.children(recursive=True):
        try:
            if "chromium" in proc.name():
                t = proc.cpu_times()
                chromium[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    t = me.cpu_times()
    return {"tavern": t.user + t.system, "chromium": chromium}


def cpu_percent(before: dict, after: dict, seconds: float) -> dict[str, int]:
    chromium = sum(v - before["chromium"].get(pid, 0.0) for pid, v in after["chromium"].items())
    return {"tavern_cpu_percent": round(100 * (after["tavern"] - before["tavern"]) / seconds),
            "chromium_cpu_percent": round(100 * chromium / seconds)}


def tokens_per_second(ledger: Ledger, since: float, until: float) -> tuple[float | None, int]:
    """Median of the daemon's per-step tokens/s (tokens of a step / its duration) over the window."""
    rows = ledger.query("SELECT tokens_per_second FROM steps WHERE time > ? AND time <= ? AND "
                        "tokens_per_second IS NOT NULL", (since, until))
    if not rows:
        return None, 0
    return statistics.median(r["tokens_per_second"] for r in rows), len(rows)


def training_cost(browser, clients: int, window_seconds: float) -> dict:
    if not (STORIES260K.exists() and GSM8K.exists()):
        return {"skipped": f"{STORIES260K} or {GSM8K} is absent"}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        realm = init_realm(Path(tmp) / "realm", overrides={
            "hero": {"base_model": str(STORIES260K)},
            "training": {"max_length": 384, "micro_batch_size": 2, "save_steps": 100000, "eval_steps": 0,
                         "eval_holdout_every": 0},
            "validation": {"field_map": {"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}}}})
        with open(GSM8K, encoding="utf-8") as src:
            lines = src.readlines()
        # enough training for every window: GSM8K three times, in three orders (distinct content hashes)
        for name, order in (("gsm8k_train.jsonl", lines), ("gsm8k_train_reversed.jsonl", lines[::-1]),
                            ("gsm8k_train_interleaved.jsonl", lines[::2] + lines[1::2])):
            (realm.inbox / name).write_text("".join(order))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = stack.enter_context(open(realm.logs / "daemon.log", "wb"))
        daemon = subprocess.Popen([sys.executable, "-m", "training", "--realm", str(realm.root), "daemon"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        server = Server(realm)
        ledger = Ledger(realm.ledger_path)
        try:
            deadline = time.monotonic() + 180
            while not ledger.query("SELECT 1 FROM steps WHERE global_step >= 20"):
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError(f"the daemon did not train; see {realm.logs / 'daemon.log'}")
                time.sleep(0.5)
            windows = []
            for kind in ("socketio", "browser"):
                for n in (0, clients, 0, clients, 0):  # alternate: the machine's load drifts
                    watchers = open_clients(kind, browser, server.url, n)
                    start, cpu = time.time(), cpu_seconds()
                    time.sleep(window_seconds)
                    end, cpu_end = time.time(), cpu_seconds()
                    tps, nsteps = tokens_per_second(ledger, start, end)
                    windows.append({"kind": kind, "clients": n, "steps": nsteps,
                                    "tokens_per_second": None if tps is None else round(tps, 1),
                                    **cpu_percent(cpu, cpu_end, end - start)})
                    if kind == "socketio" and n:
                        windows[-1]["events_received"] = sum(w.events for w in watchers)
                    for w in watchers:
                        w.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(120)
            ledger.close()
            server.close()
    def median_of(kind: str, n: int) -> float | None:
        xs = [w["tokens_per_second"] for w in windows
              if w["kind"] == kind and w["clients"] == n and w["tokens_per_second"] is not None]
        return statistics.median(xs) if xs else None

    summary = {}
    for kind in ("socketio", "browser"):
        idle, watched = median_of(kind, 0), median_of(kind, clients)
        summary[kind] = {"median_tokens_per_second_0_clients": idle,
                         f"median_tokens_per_second_{clients}_clients": watched,
                         "ratio": round(watched / idle, 3) if idle and watched else None}
    return {"summary": summary, "windows": windows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between step rows (part 1)")
    ap.add_argument("--window-seconds", type=float, default=15.0)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    result: dict = {"machine": f"{os.cpu_count()} CPUs", "poll_interval_seconds": 0.1}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        result["latency"] = [latency(browser, k, args.steps, args.interval) for k in (1, args.clients)]
        if not args.skip_training:
            result["training"] = training_cost(browser, args.clients, args.window_seconds)
        browser.close()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tavern_push.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
