"""The platform behind the server: files, fine-tuning jobs, batch jobs and the fine-tuned
models they make, kept in a store (SQLite by default, PostgreSQL by URL) and a data
directory, so that a restarted server, or another server sharing the store, finds them all.

``Platform`` is one server's handle on it: the data directory, the store, the launcher of
job workers, and the base model it fine-tunes and serves.
"""

from __future__ import annotations

from dataclasses import dataclass

from galerne.platform.datadir import DataDir, default_data_dir
from galerne.platform.store import Store, default_url


@dataclass
class Platform:
    data: DataDir
    store: Store
    base_id: str  # the served base model's id: jobs name it, fine-tuned ids embed it
    base_path: str  # what a worker loads (a folder, or a built-in model's name)
    settings: object = None  # the ServerSettings
    launcher: object = None  # made on first use (make_launcher)

    @classmethod
    def open(cls, settings, *, base_id: str, base_path: str) -> Platform:
        data = DataDir(settings.data_dir or default_data_dir())
        store = Store(settings.database_url or default_url(data.root))
        return cls(data, store, base_id, base_path, settings)

    @staticmethod
    def check(settings) -> None:
        """Open (and close) the data directory and the store ``settings`` name: a ConfigError
        that says what is wrong, before a server spends minutes loading its model."""
        data = DataDir(settings.data_dir or default_data_dir())
        Store(settings.database_url or default_url(data.root)).close()

    def close(self) -> None:
        self.store.close()


__all__ = ["DataDir", "Platform", "Store", "default_data_dir"]
