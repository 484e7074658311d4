"""The recorder's kinds of request (observe/recorder.py Shape): one look-up per request serves the metrics and the
access log's line pieces, so requests that differ only in what the log writes (path, upstream model, attempts, ...)
must still get their own lines, while their series stay those of the bounded labels."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from apertis_proxy.observe.access_log import AccessLog
from apertis_proxy.observe.recorder import Recorder
from apertis_proxy.plugin_api import UsageRecord

KNOWN = "claude-sonnet-5-5"


def run(recorder: Recorder, request_id: str, method: str, path: str, status: int,
        record: UsageRecord | None = None) -> None:
    cycle = recorder.begin(request_id)
    if record is not None:
        recorder.finished(record)
    req = SimpleNamespace(method=method, path=path, client="127.0.0.1:9")
    recorder.end(request_id, cycle, req, SimpleNamespace(status=status, request_id=request_id))


def usage(request_id: str, **kw) -> UsageRecord:
    fields = dict(request_id=request_id, started_at=0.0, endpoint="/v1/messages", key_name="alice",
                  channel_name="main", requested_model=KNOWN, upstream_model=KNOWN, status=200, attempts=1,
                  input_tokens=10, output_tokens=2, cost=0.5)
    fields.update(kw)
    return UsageRecord(**fields)


@pytest.mark.parametrize("metrics", [True, False], ids=["metrics-on", "metrics-off"])
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_lines_noted_by_the_recorder_are_those_of_the_requests_facts(fmt, metrics):
    log = AccessLog(fmt)
    recorder = Recorder(lambda name: name == KNOWN, log=log, count=metrics)
    requests = [
        ("r1", "POST", "/v1/messages", 200, usage("r1")),
        ("r2", "POST", "/v1/messages", 200, usage("r2", upstream_model="claude-x-1")),
        ("r3", "POST", "/v1/messages", 200, usage("r3", attempts=2)),
        ("r4", "POST", "/v1/messages", 529, usage("r4", status=529, error_type="overloaded_error")),
        ("r5", "POST", "/v1/messages", 404, usage("r5", requested_model='odd "one"', status=404)),
        ("r6", "POST", "/v1/messages", 404, usage("r6", requested_model='odd "two"', status=404)),
        ("r7", "GET", "/v1/models/a", 200, None),
        ("r8", "GET", "/v1/models/b", 200, None),
        ("r9", "HEAD", "/v1/models/b", 200, None),
        ("r10", "POST", "/v1/messages", 200, usage("r10")),
    ]
    for request in requests:
        run(recorder, *request)
    noted = log.pending
    log.pending = []
    if log._timer is not None:
        log._timer.cancel()
        log._timer = None
    expected = [log.entry(when, seconds, status, method, path, client, request_id, record)
                for (_, when, seconds, client, request_id, record), (_, method, path, status, _) in
                zip(noted, requests)]
    assert log.lines(noted) == log.lines(expected)
    assert len({entry[0] for entry in noted}) == 9      # r1 and r10 share their kind's pieces
    if metrics:
        counted = {labels: n[0] for labels, n in recorder.requests.items()}
        assert counted[("/v1/messages", KNOWN, "main", 200)] == 4
        assert counted[("/v1/models", "none", "none", 200)] == 3
        assert counted[("/v1/messages", "other", "main", 404)] == 2
        assert recorder.usage[(KNOWN,)][:2] == [50, 10]
    assert recorder.in_flight == 0 and recorder.cycles == {}
