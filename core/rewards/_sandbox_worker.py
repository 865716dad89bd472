"""The worker process of :class:`core.rewards.sandbox.SandboxedReward` (run as a script, imports nothing of
the project). Loads a realm's reward file and answers one JSON line per request on a private pipe.

    python -I _sandbox_worker.py REWARD_FILE FUNCTION MEMORY_LIMIT_BYTES

Protocol (UTF-8 JSON lines): first ``{"ready": true}`` or ``{"ready": false, "error": str}``; then for each
request ``{"prompt", "completion", "refs"}`` one reply ``{"ok": true, "value": <whatever the function
returned, as JSON>}`` or ``{"ok": false, "error": str}``. The protocol uses a duplicate of the original
stdout; file descriptor 1 is pointed at stderr so anything the reward prints cannot corrupt it.
"""

import importlib.util
import json
import os
import sys
import traceback


def _reply(channel, obj) -> None:
    try:
        line = json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError):
        line = json.dumps({"ok": True, "value": repr(obj.get("value"))[:200]})
    channel.write(line + "\n")
    channel.flush()


def main() -> None:
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the reward's prints (and os.write(1, ...)) go to stderr, never into the protocol
    sys.stdout = sys.stderr
    path, function, memory_limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if memory_limit > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
        spec = importlib.util.spec_from_file_location("realm_reward", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as a normal import would (dataclasses and pickle look it up)
        spec.loader.exec_module(module)
        fn = getattr(module, function, None)
        if not callable(fn):
            raise AttributeError(f"{path} defines no function {function}(prompt, completion, **refs)")
    except BaseException:  # noqa: BLE001 - report anything, including SystemExit, as a load error
        _reply(channel, {"ready": False, "error": traceback.format_exc(limit=5)[-2000:]})
        return
    _reply(channel, {"ready": True})
    for line in sys.stdin:
        try:
            request = json.loads(line)
            value = fn(request["prompt"], request["completion"], **request.get("refs", {}))
            if isinstance(value, bool | int | float):
                _reply(channel, {"ok": True, "value": value})
            else:
                _reply(channel, {"ok": True, "value": repr(value)[:200], "type": type(value).__name__})
        except BaseException:  # noqa: BLE001
            _reply(channel, {"ok": False, "error": traceback.format_exc(limit=5)[-2000:]})


if __name__ == "__main__":
    main()
