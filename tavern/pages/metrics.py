"""Prometheus metrics (blueprint ``metrics``): ``GET /metrics`` in the text exposition format (OpenMetrics
when the scraper asks for it), through ``prometheus_client``.

A custom collector reads the ledger on every scrape -- nothing is cached or counted in the Tavern -- with
the same numbers as ``/api/status`` (:func:`tavern.status.build_status`):

=========================================  ==================================================================
metric                                     value
=========================================  ==================================================================
``realm_global_step``                      optimizer steps since the hero was created
``realm_loss``                             training loss of the latest step (nats per token)
``realm_eval_loss``                        latest validation loss (nats per token)
``realm_learning_rate``                    learning rate of the latest step
``realm_grad_norm``                        pre-clipping gradient L2 norm of the latest step
``realm_tokens_per_second``                training throughput (the daemon's, while it trains; else the
                                           latest step's)
``realm_quests{state}``                    quests per state (validating, queued, processing, completed, ...)
``realm_queued_quests{priority}``          queued quests per priority
``realm_daemon_up``                        1 while the daemon's heartbeat is fresh, else 0
``realm_daemon_heartbeat_age_seconds``     seconds since the daemon's last heartbeat
``realm_last_checkpoint_global_step``      global step of the newest checkpoint
``realm_last_checkpoint_age_seconds``      seconds since the newest checkpoint was saved
``realm_gpu_memory_used_bytes{gpu,name}``  per GPU, when NVML answers (also ``..._total_bytes`` and
                                           ``realm_gpu_utilization_percent``)
=========================================  ==================================================================

A metric without a value (no step yet, no GPU) is left out rather than reported as 0. ``/metrics`` is a
GET, so the Tavern's rules apply as for any page: loopback ``Host`` names only without an access token;
with one, the scraper sends ``Authorization: Bearer <tavern.access_token>`` (Prometheus:
``authorization: {credentials: ...}`` in the scrape config).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from core.ledger import QuestState
from core.realm import PRIORITIES
from tavern.context import TavernState, tavern_state
from tavern.status import build_status

bp = Blueprint("metrics", __name__)

REGISTRY_KEY = "tavern_metrics_registry"
PREFIX = "realm_"


def _gauge(name: str, doc: str, value: float | None, unit: str = "") -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(PREFIX + name, doc, value=float(value), unit=unit)


class RealmCollector(Collector):
    """Reads the realm's ledger (and NVML) at each ``collect()``: one scrape, one consistent read."""

    def __init__(self, state: TavernState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        now = time.time()
        status = build_status(s.ledger, s.realm, s.config, now=now)
        m = status["metrics"]
        yield from _gauge("global_step", "Optimizer steps since the hero was created (never reset).", m["global_step"])
        yield from _gauge("loss", "Training loss of the latest step, nats per token.", m["loss"])
        yield from _gauge("eval_loss", "Latest validation loss on held-out examples, nats per token.", m["eval_loss"])
        yield from _gauge("learning_rate", "Learning rate of the latest step.", m["learning_rate"])
        yield from _gauge("grad_norm", "Pre-clipping gradient L2 norm of the latest step.", m["grad_norm"])
        yield from _gauge("tokens_per_second", "Training throughput in tokens per second.", m["tokens_per_second"])

        quests = GaugeMetricFamily(PREFIX + "quests", "Quests (training data files) per state.", labels=["state"])
        for state in QuestState:
            quests.add_metric([state.value], float(status["queue"].get(state.value, 0)))
        yield quests
        queued = GaugeMetricFamily(PREFIX + "queued_quests", "Queued quests per priority.", labels=["priority"])
        counts = s.ledger.queued_by_priority()
        for priority in PRIORITIES:
            queued.add_metric([priority], float(counts.get(priority, 0)))
        yield queued

        daemon = status["daemon"]
        yield from _gauge("daemon_up", "1 while the training daemon's heartbeat is fresh, else 0.",
                          1.0 if daemon["alive"] else 0.0)
        yield from _gauge("daemon_heartbeat_age_seconds", "Seconds since the daemon's last heartbeat.",
                          daemon["heartbeat_age_seconds"])
        saved = s.ledger.last_event("checkpoint_saved")
        last = status["last_checkpoint"] or {}
        step = last.get("step", last.get("global_step"))
        if saved is not None and saved["data"]:
            step = json.loads(saved["data"]).get("step", step)
        yield from _gauge("last_checkpoint_global_step", "Global step of the newest checkpoint.", step)
        yield from _gauge("last_checkpoint_age_seconds", "Seconds since the newest checkpoint was saved.",
                          max(0.0, now - saved["time"]) if saved is not None else None)
        yield from self._gpus()

    def _gpus(self) -> Iterator[Metric]:
        from tavern.pages.system import gpu_info

        gpus = gpu_info().get("gpus") or []
        if not gpus:
            return
        used = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu", "name"])
        total = GaugeMetricFamily(PREFIX + "gpu_memory_total_bytes", "GPU memory in total (NVML).",
                                  labels=["gpu", "name"])
        busy = GaugeMetricFamily(PREFIX + "gpu_utilization_percent", "GPU utilization, 0-100 (NVML).",
                                 labels=["gpu", "name"])
        for g in gpus:
            labels = [str(g["index"]), str(g["name"])]
            used.add_metric(labels, float(g["memory_used_bytes"]))
            total.add_metric(labels, float(g["memory_total_bytes"]))
            if g.get("utilization_percent") is not None:
                busy.add_metric(labels, float(g["utilization_percent"]))
        yield from (used, total, busy)


def registry() -> CollectorRegistry:
    """The app's registry (one :class:`RealmCollector`), made at the first scrape."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    reg = app.extensions.get(REGISTRY_KEY)
    if reg is None:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(RealmCollector(tavern_state(app)))
        app.extensions[REGISTRY_KEY] = reg
    return reg


@bp.get("/metrics")
def metrics():
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    resp = Response(encoder(registry()), content_type=content_type)
    resp.headers["Cache-Control"] = "no-store"
    return resp
