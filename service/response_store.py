"""The Responses API store: stored responses, their input items and the conversation that led to them.

An embedded SQLite file (stdlib sqlite3, WAL mode) under the cache directory, one per replica (the service
workers of one replica share it): a response is found only on the replica that created it (README "Responses
API", several replicas). Rows expire after the
retention; expired rows are never returned and are purged on the next write. Calls block, so the servicer
runs them in a thread.
"""

from __future__ import annotations

import json
import pathlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    response TEXT NOT NULL,      -- the Response object's JSON (protobuf JSON mapping)
    input_items TEXT NOT NULL,   -- the request's own input items (ResponseItem JSON), oldest first
    conversation TEXT NOT NULL   -- chat messages of the whole chain, output included, for continuation
);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
"""


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, path: pathlib.Path, retention_s: float):
        self.path = pathlib.Path(path)
        self.retention_s = retention_s
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None  # opened on first use: servers that never see the
        # Responses API create no file

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")  # several processes may share one file
            connection.execute("PRAGMA busy_timeout=5000")
            connection.executescript(_SCHEMA)
            self._connection = connection
        return self._connection

    def put(self, response_id: str, stored: StoredResponse) -> None:
        now = time.time()
        with self._lock:
            db = self._db()
            db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                       (response_id, now + self.retention_s, json.dumps(stored.response),
                        json.dumps(stored.input_items), json.dumps(stored.conversation)))

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db().execute(
                "SELECT response, input_items, conversation FROM responses WHERE id = ? AND expires_at > ?",
                (response_id, time.time())).fetchone()
        if row is None:
            return None
        return StoredResponse(*(json.loads(column) for column in row))

    def delete(self, response_id: str) -> bool:
        with self._lock:
            cursor = self._db().execute("DELETE FROM responses WHERE id = ? AND expires_at > ?",
                                        (response_id, time.time()))
        return cursor.rowcount > 0

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
