"""What operators see: Prometheus metrics, the access log, readiness.

    recorder.py     counts requests, attempts, tokens and cost in this process (plain dicts: the request path
                    pays a few dictionary updates, nothing more)
    exposition.py   the figures of one or more workers -> Prometheus / OpenMetrics text (prometheus_client)
    shared.py       with --workers: each worker's figures in a file of the server's run directory
    access_log.py   one line per request, text or JSON, written in batches
    logs.py         the process's log format (the gateway's own messages use the access log's format)
    readiness.py    GET /ready: store reachable, a channel enabled, not draining
    app.py          the wrapper around the gateway's application: begin/end of every request, /metrics, /ready
"""
