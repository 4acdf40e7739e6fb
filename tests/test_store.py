"""The platform's store, on SQLite and on PostgreSQL (a throwaway cluster, tests/pgcluster.py;
those cases skip where PostgreSQL is not installed): records and their JSON documents,
paging, a job's events and checkpoints, and the races a shared store must win (several
workers claiming one job, two processes writing events at once)."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from galerne.errors import ConfigError
from galerne.platform.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'galerne.db'}"
    return request.getfixturevalue("postgres_cluster").new_database()


@pytest.fixture
def store(url):
    s = Store(url)
    yield s
    s.close()


def job(id: str, *, status: str = "QUEUED", created_at: int = 1000, **doc) -> dict:
    return {"id": id, "kind": "fine_tune", "status": status, "model": "base", "created_at": created_at,
            "modified_at": created_at, **doc}


def test_kind(store, url):
    assert store.kind == ("sqlite" if url.startswith("sqlite") else "postgresql")


def test_insert_get_update(store):
    store.insert("jobs", job("j1", hyperparameters={"n_epochs": 3}, suffix=None))
    got = store.get("jobs", "j1")
    assert got["status"] == "QUEUED" and got["hyperparameters"] == {"n_epochs": 3} and got["suffix"] is None
    assert got["owner"] is None and got["heartbeat"] is None
    assert store.get("jobs", "nope") is None

    # A column and a document key at once; a key set to None stays, as null.
    out = store.update("jobs", "j1", heartbeat=12.5, error={"message": "x"}, suffix="s")
    assert out["heartbeat"] == 12.5 and out["error"] == {"message": "x"} and out["modified_at"] > 1000
    out = store.update("jobs", "j1", error=None)
    assert out["error"] is None
    got = store.get("jobs", "j1")
    assert got["heartbeat"] == 12.5 and "error" in got and got["error"] is None and got["suffix"] == "s"
    assert got["hyperparameters"] == {"n_epochs": 3}  # untouched keys are kept

    assert store.update("jobs", "nope", suffix="x") is None
    assert store.update("jobs", "j1", expect=["RUNNING"], suffix="y") is None  # another status: no change
    assert store.get("jobs", "j1")["suffix"] == "s"


def test_transition(store):
    store.insert("jobs", job("j1"))
    won = store.transition("j1", ["QUEUED"], "RUNNING", owner="local:h:1:2:/log")
    assert won["status"] == "RUNNING" and won["owner"] == "local:h:1:2:/log"
    assert store.transition("j1", ["QUEUED"], "RUNNING", owner="other") is None
    assert store.get("jobs", "j1")["owner"] == "local:h:1:2:/log"
    assert store.transition("j1", ["QUEUED", "RUNNING"], "CANCELLED", owner=None)["status"] == "CANCELLED"
    got = store.get("jobs", "j1")
    assert got["status"] == "CANCELLED" and got["owner"] is None
    assert store.transition("nope", ["QUEUED"], "RUNNING") is None


def test_delete_cascades(store):
    store.insert("jobs", job("j1"))
    store.insert("jobs", job("j2"))
    for j in ("j1", "j2"):
        store.add_event(j, message="hello")
        store.add_checkpoint(j, 10, path="/ckpt")
    assert store.delete("jobs", "j1")
    assert not store.delete("jobs", "j1")
    assert store.get("jobs", "j1") is None
    # A job's events and checkpoints go with it (ON DELETE CASCADE: SQLite needs its pragma).
    assert store.events("j1") == [] and store.checkpoints("j1") == []
    assert len(store.events("j2")) == 1 and len(store.checkpoints("j2")) == 1


def test_select_where_order_count(store):
    for i in range(6):
        store.insert("jobs", job(f"j{i}", status="QUEUED" if i % 2 else "RUNNING", created_at=1000 + i))
    store.insert("jobs", {**job("b0", created_at=999), "kind": "batch"})

    def ids(rows):
        return [r["id"] for r in rows]

    assert ids(store.select("jobs", where={"kind": "fine_tune"})) == ["j5", "j4", "j3", "j2", "j1", "j0"]
    assert ids(store.select("jobs", where={"kind": "fine_tune"}, descending=False)) == [f"j{i}" for i in range(6)]
    assert ids(store.select("jobs", where={"status": "QUEUED", "kind": "fine_tune"})) == ["j5", "j3", "j1"]
    assert ids(store.select("jobs", where={"status": ["QUEUED", "RUNNING"]}, limit=3)) == ["j5", "j4", "j3"]
    assert ids(store.select("jobs", limit=2, offset=5)) == ["j0", "b0"]
    assert ids(store.jobs_where("batch", ["QUEUED"])) == ["b0"]
    assert store.count("jobs") == 7
    assert store.count("jobs", where={"kind": "fine_tune", "status": ["RUNNING"]}) == 3
    assert store.count("jobs", where={"status": "FAILED"}) == 0


@pytest.mark.parametrize("descending", [True, False])
def test_select_after_pages_through_ties(store, descending):
    """Paging with ``after`` visits every row once, in order, also across rows of the same
    ``created_at`` (the id breaks ties): seconds are coarse, ties are the usual case."""
    for i in range(11):
        store.insert("files", {"id": f"file-{i:02d}", "created_at": 1000 + i // 4, "purpose": "fine-tune"})
    everything = [r["id"] for r in store.select("files", descending=descending)]
    assert len(everything) == 11
    seen, after = [], None
    while True:
        page = store.select("files", descending=descending, limit=3, after=after)
        if not page:
            break
        seen += [r["id"] for r in page]
        after = page[-1]["id"]
    assert seen == everything
    keys = [(int(i[5:]) // 4, i) for i in everything]
    assert keys == sorted(keys, reverse=descending)


def test_events_in_order_and_paged(store):
    store.insert("jobs", job("j1"))
    store.insert("jobs", job("j2"))
    for i in range(25):  # all in the same second: the order is the insertion's
        store.add_event("j1", message=f"step {i}", level="info", data={"step": i}, created_at=1234)
        if i % 5 == 0:
            store.add_event("j2", message=f"other {i}")
    evs = store.events("j1")
    assert [e["message"] for e in evs] == [f"step {i}" for i in range(25)]
    assert all(e["id"].startswith("ftevent-") and e["data"] == {"step": i} for i, e in enumerate(evs))
    assert [e["message"] for e in store.events("j1", newest_first=True, limit=3)] == ["step 24", "step 23", "step 22"]
    pages, after = [], None
    while page := store.events("j1", after=after, limit=10):
        pages.append([e["data"]["step"] for e in page])
        after = page[-1]["id"]
    assert pages == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    older = store.events("j1", after=evs[5]["id"], newest_first=True)
    assert [e["data"]["step"] for e in older] == [4, 3, 2, 1, 0]
    assert len(store.events("j2")) == 5


def test_checkpoints_newest_first(store):
    store.insert("jobs", job("j1"))
    for step in (10, 30, 20):
        store.add_checkpoint("j1", step, path=f"/ckpt/{step}", metrics={"train_loss": step / 100})
    got = store.checkpoints("j1")
    assert [c["step"] for c in got] == [30, 20, 10]
    assert got[0]["path"] == "/ckpt/30" and got[0]["metrics"] == {"train_loss": 0.3}
    assert got[0]["id"].startswith("ftckpt-") and got[0]["job_id"] == "j1"


def test_json_documents_round_trip(store):
    doc = {"nested": {"list": [1, 2.5, None, True, "é 漢字 🙂"], "empty": {}, "deep": [[{"a": []}]]},
           "float": 1e-7, "big": 2**53, "neg": -3, "flag": False, "none": None, "quote": "it's \"quoted\"\n"}
    store.insert("models", {"id": "ft:base:x", "base": "base", "created_at": 5, "archived": False, **doc})
    got = store.get("models", "ft:base:x")
    assert {k: got[k] for k in doc} == doc
    assert got["archived"] is False
    assert store.select("models", where={"base": "base"})[0]["nested"] == doc["nested"]


@pytest.mark.parametrize("bad", [
    "postgresql://alice:s3cret@/nodb?host=/nonexistent-galerne-socket&port=1",
    "nosuchdb://alice:s3cret@host/db",
    "sqlite:////proc/galerne-no/such/db.sqlite",
])
def test_bad_url_is_config_error(bad):
    with pytest.raises(ConfigError) as e:
        Store(bad)
    msg = str(e.value)
    assert "s3cret" not in msg
    assert bad.split("://")[0] in msg and ("alice:***@" in msg or "alice" not in bad)


# ------------------------------------------------------------------ races between processes
# Each racer is another process (spawn: a fresh interpreter, as a worker would be), opens
# its own Store, and waits at a barrier so that all go at once.


def _open(url: str, barrier, results) -> None:
    barrier.wait()
    try:
        Store(url).close()
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the test shows what it was
        results.put(f"{type(e).__name__}: {e}")


def _claim(url: str, me: str, barrier, results) -> None:
    store = Store(url)
    barrier.wait()
    won = store.transition("job", ["QUEUED"], "RUNNING", owner=me)
    results.put((me, won is not None and won["owner"] == me))
    store.close()


def _write_events(url: str, me: str, n: int, barrier) -> None:
    store = Store(url)
    barrier.wait()

    def write(thread: int) -> None:
        for i in range(n):
            store.add_event("job", message=f"{me}-{thread}", data={"i": i})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()


def _run_all(procs) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)


@pytest.mark.slow
def test_new_store_opened_at_once(url):
    """Servers and workers starting together on a new database all get the schema (SQLite
    answered "database is locked" to all but one, PostgreSQL "relation already exists")."""
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    _run_all([ctx.Process(target=_open, args=(url, barrier, results)) for _ in range(n)])
    assert [results.get(timeout=10) for _ in range(n)] == ["ok"] * n
    assert Store(url).count("jobs") == 0


@pytest.mark.slow
def test_one_claim_wins(store, url):
    store.insert("jobs", job("job"))
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    _run_all([ctx.Process(target=_claim, args=(url, f"worker-{i}", barrier, results)) for i in range(n)])
    outcome = dict(results.get(timeout=10) for _ in range(n))
    winners = [me for me, won in outcome.items() if won]
    assert len(winners) == 1, outcome
    got = store.get("jobs", "job")
    assert got["status"] == "RUNNING" and got["owner"] == winners[0]


@pytest.mark.slow
def test_concurrent_events_lose_nothing(store, url):
    store.insert("jobs", job("job"))
    ctx = multiprocessing.get_context("spawn")
    n = 60
    barrier = ctx.Barrier(2)
    _run_all([ctx.Process(target=_write_events, args=(url, me, n, barrier)) for me in ("a", "b")])
    evs = store.events("job")
    assert len(evs) == 4 * n and len({e["id"] for e in evs}) == 4 * n
    for writer in ("a-0", "a-1", "b-0", "b-1"):  # each writer's events in its own order
        assert [e["data"]["i"] for e in evs if e["message"] == writer] == list(range(n))
