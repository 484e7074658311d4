"""Child process of sdk_legacy.LegacySdkProcess: runs sdk_scenarios under whichever `anthropic` comes first on
sys.path (the parent puts tests/.legacy-sdk/anthropic-1.17.0 there).

Protocol, one JSON object per line. The child first writes ``{"hello": {"anthropic": VERSION}}``. Then for each
request line ``{"id", "mode": "sync"|"async", "name", "args"}`` it writes ``{"id", "result"}`` (the scenario's
result, SDK errors included) or ``{"id", "crash": traceback}`` (a bug in the scenario or harness). Requests run
concurrently, one thread each, and are answered in completion order.
"""
import asyncio
import json
import sys
import threading
import traceback


def main() -> None:
    channel = sys.stdout
    sys.stdout = sys.stderr  # a stray print must not corrupt the protocol
    write_lock = threading.Lock()

    def reply(message: dict) -> None:
        with write_lock:
            channel.write(json.dumps(message) + "\n")
            channel.flush()

    import anthropic
    import sdk_scenarios

    def handle(request: dict) -> None:
        try:
            if request["mode"] == "sync":
                result = sdk_scenarios.run_sync(request["name"], **request["args"])
            else:
                result = asyncio.run(sdk_scenarios.run_async(request["name"], **request["args"]))
            reply({"id": request["id"], "result": result})
        except BaseException:
            reply({"id": request["id"], "crash": traceback.format_exc()})

    reply({"hello": {"anthropic": anthropic.__version__}})
    for line in sys.stdin:
        threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()


if __name__ == "__main__":
    main()
