"""System (blueprint ``system``): GPUs through NVML (nvidia-ml-py), CPU, RAM, disk through psutil.

- ``GET /system`` — the page (``static/js/system.js`` refreshes it every 2 s).
- ``GET /api/system`` — ``{"gpu": {"available", "reason", "driver_version", "gpus": [{"index", "name",
  "utilization_percent", "memory_used_bytes", "memory_total_bytes", "temperature_c", "power_w",
  "power_limit_w"}]}, "cpu": {"count", "percent", "per_cpu_percent", "load_average"}, "memory": {...bytes},
  "swap": {...}, "disk": {"path", "total_bytes", "used_bytes", "free_bytes", "percent"},
  "processes": [{"role", "pid", "cpu_percent", "rss_bytes", "threads"}], "training_memory": {"device",
  "estimate": {...} (:class:`core.memory.MemoryEstimate`, bytes), "lines", "free_bytes", "fits"} or
  {"error"}}``. Percentages 0..100 (cpu_percent of a process can exceed 100 on several cores), watts,
  degrees Celsius. ``training_memory``: the estimate of the realm's config for the GPU when NVML sees one
  (else the CPU) beside that device's free memory (GPU 0's free memory, or available RAM).

Without an NVIDIA GPU (or driver) ``gpu.available`` is false and ``gpu.reason`` says why, in words.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
from flask import Blueprint, jsonify, render_template

from core.memory import estimate_for_realm
from tavern.context import current_config, current_ledger, current_realm

bp = Blueprint("system", __name__)

_nvml_lock = threading.Lock()
_nvml_state: dict = {"initialised": False, "error": None}
_processes: dict[int, psutil.Process] = {}  # cached so cpu_percent measures between two calls
psutil.cpu_percent(interval=None)  # the first reading of each counter is meaningless (0.0): prime them
psutil.cpu_percent(interval=None, percpu=True)


def _nvml():
    """Import and initialise NVML once; returns the module or None (reason in ``_nvml_state``)."""
    with _nvml_lock:
        if _nvml_state["initialised"]:
            import pynvml

            return pynvml
        if _nvml_state["error"] is not None:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ImportError
            _nvml_state["error"] = f"{type(exc).__name__}: {exc}"
            return None
        _nvml_state["initialised"] = True
        return pynvml


def gpu_info() -> dict:
    """Per-GPU utilization (%), memory (bytes), temperature (°C), power and its limit (W)."""
    nv = _nvml()
    if nv is None:
        return {"available": False, "gpus": [], "driver_version": None,
                "reason": "No NVIDIA GPU found: training runs on the CPU. (NVML could not start: "
                          f"{_nvml_state['error']})"}
    gpus = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        gpus.append({
            "index": i,
            "name": _text(nv.nvmlDeviceGetName(h)),
            "utilization_percent": _try(lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu),
            "memory_used_bytes": int(mem.used),
            "memory_total_bytes": int(mem.total),
            "temperature_c": _try(lambda h=h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_w": _try(lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            "power_limit_w": _try(lambda h=h: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0),
        })
    driver = _try(lambda: _text(nv.nvmlSystemGetDriverVersion()))
    return {"available": bool(gpus), "gpus": gpus, "driver_version": driver,
            "reason": None if gpus else "NVML runs but reports no GPU"}


def _try(fn):
    """A reading some GPUs do not support (e.g. power on some boards) becomes None."""
    try:
        return fn()
    except Exception:
        return None


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _process(role: str, pid: int | None) -> dict | None:
    if not pid:
        return None
    try:
        proc = _processes.get(pid) or _processes.setdefault(pid, psutil.Process(pid))
        with proc.oneshot():
            return {"role": role, "pid": pid, "cpu_percent": proc.cpu_percent(interval=None),
                    "rss_bytes": proc.memory_info().rss, "threads": proc.num_threads()}
    except psutil.Error:
        _processes.pop(pid, None)
        return None


def training_memory(gpu: dict, available_ram: int) -> dict:
    """The training memory estimate beside the free memory of the device training would use."""
    device = "cuda" if gpu.get("available") else "cpu"
    try:
        est = estimate_for_realm(current_realm(), current_config(), device=device)
    except Exception as exc:  # a missing base model or unreadable config.json: say so, never fail the page
        return {"device": device, "error": f"{type(exc).__name__}: {exc}"}
    if device == "cuda":
        first = gpu["gpus"][0]
        free = first["memory_total_bytes"] - first["memory_used_bytes"]
    else:
        free = available_ram
    return {"device": device, "estimate": est.to_dict(), "lines": est.lines(), "free_bytes": int(free),
            "fits": est.total_bytes <= free}


def system_info() -> dict:
    realm = current_realm()
    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    disk = psutil.disk_usage(str(realm.root))
    daemon = current_ledger().daemon_status()
    procs = [_process("tavern", os.getpid()),
             _process("daemon", daemon.pid if daemon.process_alive else None)]
    gpu = gpu_info()
    return {
        "time": time.time(),
        "gpu": gpu,
        "training_memory": training_memory(gpu, vm.available),
        "cpu": {"count": psutil.cpu_count(), "percent": psutil.cpu_percent(interval=None),
                "per_cpu_percent": psutil.cpu_percent(interval=None, percpu=True),
                "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "memory": {"total_bytes": vm.total, "available_bytes": vm.available, "used_bytes": vm.used,
                   "percent": vm.percent},
        "swap": {"total_bytes": sw.total, "used_bytes": sw.used, "percent": sw.percent},
        "disk": {"path": str(realm.root), "total_bytes": disk.total, "used_bytes": disk.used,
                 "free_bytes": disk.free, "percent": disk.percent},
        "processes": [p for p in procs if p],
    }


@bp.get("/system")
def index():
    return render_template("system.html")


@bp.get("/api/system")
def api_system():
    return jsonify(system_info())
