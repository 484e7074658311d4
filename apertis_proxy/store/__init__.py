"""The store: keys, channels, the catalogue, spend and the ledger, behind one service.

    service.py        Store and open_store(url): the backend's connection, named operations, run on a thread
    url.py            --db values: a SQLite path or sqlite:///path, or postgresql://...; passwords redacted
    changes.py        one change watcher per worker, publishing the ConfigSnapshot (config.py)
    schema.py         the SQLite schema and its migrations; pg_schema.py the PostgreSQL one
    pg_connection.py  PostgreSQL behind the small sqlite3-shaped interface the operations use
    keys.py, channels.py, catalog.py, spend.py, budgets.py, owned_state.py, usage.py   operations by concern
    ledger_spool.py, ledger_write.py, pg_ledger.py, retention.py                      the ledger
    copy.py           db copy; dbfile.py the SQLite file itself; key_encryption.py upstream keys at rest
"""
