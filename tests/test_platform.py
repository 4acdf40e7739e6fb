"""Files and fine-tuning jobs behind the server, in both APIs' shapes, with a real worker
process training a tiny model: upload, create, watch, chat with the result, and every
refusal (bad uploads, unknown ids, models not served, cancels at every status)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from mistralai.client import Mistral

from galerne import LLM
from galerne.config import ServerSettings
from galerne.server.app import create_app
from test_server import LiveServer

KEY = "platform-key"
MODEL = "tiny"
MISTRAL_UA = {"User-Agent": "mistral-client-python/2.5.0"}  # how mistralai 2.5 says who it is

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"What is item {i}?"},
                  {"role": "assistant", "content": f"Item {i} is a loaf of bread number {i}."}]}
    for i in range(24)
]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def live(tiny_factory, tmp_path_factory):
    folder, _ = tiny_factory("mistral")
    data = tmp_path_factory.mktemp("platform-data")
    llm = LLM(folder, device="cpu", kv_cache_gb=0.02, block_size=16)
    settings = ServerSettings(api_key=[KEY], served_model_name=[MODEL], data_dir=str(data), max_upload_mb=1.0)
    app = create_app(llm, settings)
    with LiveServer(app) as server:
        server.data = data
        yield server


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def train_file(oai):
    return oai.files.create(file=("train.jsonl", jsonl(CONVERSATIONS)), purpose="fine-tune")


def wait_for(fetch, done, timeout: float = 120.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last: {str(value)[:2000]}")
        time.sleep(every)


def openai_job(oai, file_id: str, steps: int = 3, **extra):
    return oai.fine_tuning.jobs.create(model=MODEL, training_file=file_id, suffix=extra.pop("suffix", "t"),
                                       extra_body={"hyperparameters": {"training_steps": steps, "seq_len": 128,
                                                                       "lora_rank": 4, **extra}})


OPENAI_DONE = ("succeeded", "failed", "cancelled")


# ------------------------------------------------------------------ files


def test_upload_both_clients_and_read_back(live, oai, train_file):
    assert train_file.purpose == "fine-tune" and train_file.bytes == len(jsonl(CONVERSATIONS))
    assert train_file.filename == "train.jsonl" and train_file.id.startswith("file-")
    assert oai.files.retrieve(train_file.id).bytes == train_file.bytes
    assert oai.files.content(train_file.id).read() == jsonl(CONVERSATIONS)
    mis = Mistral(api_key=KEY, server_url=live.url)
    up = mis.files.upload(file={"file_name": "batch.jsonl", "content": jsonl([{"custom_id": "1", "body": {}}])},
                          purpose="batch")
    assert up.purpose == "batch" and up.num_lines == 1 and up.sample_type == "batch_request"
    got = mis.files.retrieve(file_id=up.id)
    assert got.size_bytes == up.size_bytes and got.deleted is False
    assert mis.files.get_signed_url(file_id=up.id).url.endswith(f"/v1/files/{up.id}/content")
    assert mis.files.download(file_id=up.id).read() == jsonl([{"custom_id": "1", "body": {}}])
    listed = mis.files.list(page=0, page_size=100)
    assert {f.id for f in listed.data} >= {up.id, train_file.id} and listed.total >= 2
    assert train_file.id in {f.id for f in oai.files.list(purpose="fine-tune")}
    assert up.id not in {f.id for f in oai.files.list(purpose="fine-tune")}
    assert mis.files.delete(file_id=up.id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(up.id)
    assert not (live.data / "files" / up.id).exists()


def test_bad_uploads_are_refused_and_nothing_is_stored(live, oai, http):
    before = {f.id for f in oai.files.list()}
    bad = jsonl(CONVERSATIONS[:2]) + b"{not json\n" + jsonl([{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(openai.BadRequestError) as e:
        oai.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    message = e.value.body["message"]
    assert "bad.jsonl" in message and "line 3: bad JSON" in message and "line 4:" in message
    with pytest.raises(openai.BadRequestError, match="purpose"):
        oai.files.create(file=("a.jsonl", jsonl(CONVERSATIONS)), purpose="assistants")
    with pytest.raises(openai.BadRequestError, match="empty"):
        oai.files.create(file=("e.jsonl", b""), purpose="fine-tune")
    r = http.post("/v1/files", files={"file": ("big.jsonl", b"x" * (1 << 20) + b"\n")}, data={"purpose": "batch"})
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]["message"]
    r = http.post("/v1/files", data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = http.post("/v1/files", files={"file": ("b.jsonl", b'{"body": 1}\n')}, data={"purpose": "batch"})
    assert r.status_code == 400 and "line 1" in r.json()["error"]["message"]
    assert {f.id for f in oai.files.list()} == before
    assert list((live.data / "tmp").iterdir()) == []


def test_unknown_ids_are_404_in_each_dialect(oai, http):
    with pytest.raises(openai.NotFoundError) as e:
        oai.files.retrieve("file-nope")
    assert e.value.body["code"] == "file_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.fine_tuning.jobs.retrieve("ftjob-nope")
    r = http.get("/v1/fine_tuning/jobs/nope", headers=MISTRAL_UA)
    assert r.status_code == 404 and r.json()["object"] == "error" and r.json()["code"] == "job_not_found"
    r = http.delete("/v1/files/nope", headers=MISTRAL_UA)
    assert r.status_code == 404 and r.json()["object"] == "error"
    r = http.delete("/v1/models/ft:tiny:x:nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/fine_tuning/models/nope/archive")
    assert r.status_code == 404


# ------------------------------------------------------------------ jobs, OpenAI's shape


def test_openai_job_end_to_end(live, oai, http, train_file):
    job = openai_job(oai, train_file.id, steps=4, suffix="e2e")
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.hyperparameters.batch_size == 1 and job.training_file == train_file.id
    job = wait_for(lambda: oai.fine_tuning.jobs.retrieve(job.id), lambda j: j.status in OPENAI_DONE)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{MODEL}:e2e:{job.id.removeprefix('ftjob-')[:8]}"
    assert job.trained_tokens == 4 * 128 and job.finished_at >= job.created_at
    events = list(oai.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == [4, 3, 2, 1]  # newest first
    assert all(e.data["train_loss"] > 0 and e.data["total_steps"] == 4 for e in metrics)
    assert events[0].message.startswith("The job has successfully completed")
    ckpts = oai.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [4, 3, 2] and ckpts[0].metrics.train_loss > 0
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"
    # served at once, beside the base
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == MODEL and job.fine_tuned_model in ids
    card = oai.models.retrieve(job.fine_tuned_model)
    assert card.model_extra["job"] == job.id and card.model_extra["root"] == MODEL
    r = oai.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "What is item 3?"}],
                                    max_tokens=4, temperature=0)
    assert r.model == job.fine_tuned_model and r.choices[0].message.content
    assert job.id in {j.id for j in oai.fine_tuning.jobs.list(limit=100)}
    # deleted: not served, not listed, its adapter gone from the data directory
    assert oai.models.delete(job.fine_tuned_model).deleted
    assert job.fine_tuned_model not in [m.id for m in oai.models.list()]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert not (live.data / "models" / job.id).exists()
    with pytest.raises(openai.ConflictError):
        oai.fine_tuning.jobs.cancel(job.id)  # finished


def test_job_refusals(live, oai, http, train_file):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oai.fine_tuning.jobs.create(model="not-served", training_file=train_file.id)
    with pytest.raises(openai.NotFoundError, match="file-nope"):
        oai.fine_tuning.jobs.create(model=MODEL, training_file="file-nope")
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        oai.fine_tuning.jobs.create(model=MODEL, training_file=train_file.id, hyperparameters={"n_epochs": -1})
    with pytest.raises(openai.BadRequestError, match="lora_rank"):
        openai_job(oai, train_file.id, lora_rank=10_000)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        openai_job(oai, train_file.id, suffix="no spaces allowed")
    with pytest.raises(openai.BadRequestError, match="method.type"):
        oai.fine_tuning.jobs.create(model=MODEL, training_file=train_file.id, method={"type": "dpo", "dpo": {}})
    r = http.post("/v1/fine_tuning/jobs", headers=MISTRAL_UA,
                  json={"model": MODEL, "training_files": [{"file_id": train_file.id}],
                        "hyperparameters": {"training_steps": "many"}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "training_steps"
    batch = oai.files.create(file=("b.jsonl", jsonl([{"custom_id": "1", "body": {}}])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="not 'fine-tune'"):
        oai.fine_tuning.jobs.create(model=MODEL, training_file=batch.id)


def test_sample_longer_than_seq_len_fails_validation(oai, http, train_file):
    long = oai.files.create(file=("long.jsonl", jsonl([{"messages": [
        {"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}])), purpose="fine-tune")
    job = openai_job(oai, long.id)  # seq_len 128
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "seq_len 128" in job.error.message and long.id in job.error.message
    r = http.get(f"/v1/fine_tuning/jobs/{job.id}", headers=MISTRAL_UA).json()
    assert r["status"] == "FAILED_VALIDATION"


# ------------------------------------------------------------------ jobs, Mistral's shape (mistralai 2.5's bodies)


def test_mistral_job_auto_start_false_then_start(live, http, train_file):
    body = {"model": MODEL, "training_files": [{"file_id": train_file.id, "weight": 1}],
            "validation_files": [train_file.id], "suffix": "mis",
            "hyperparameters": {"training_steps": 3, "learning_rate": 0.0001, "seq_len": 128, "lora_rank": 4},
            "auto_start": False}
    dry = http.post("/v1/fine_tuning/jobs", params={"dry_run": "true"}, json=body).json()
    assert dry["object"] == "job.metadata" and dry["training_steps"] == 3 and dry["train_tokens"] == 3 * 128
    r = http.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "job" and job["job_type"] == "completion" and job["status"] == "VALIDATED"
    assert job["auto_start"] is False and job["training_files"] == [train_file.id]
    meta = job["metadata"]
    assert meta["train_tokens"] == 3 * 128 and meta["train_tokens_per_step"] == 128 and meta["data_tokens"] > 0
    assert meta["expected_duration_seconds"] >= 0
    assert [e["data"]["status"] for e in job["events"]] == ["VALIDATING", "VALIDATED"]
    time.sleep(1.5)  # the supervisor does not start a VALIDATED job
    assert http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "VALIDATED"
    started = http.post(f"/v1/fine_tuning/jobs/{job['id']}/start").json()
    assert started["status"] in ("QUEUED", "RUNNING")
    assert http.post(f"/v1/fine_tuning/jobs/{job['id']}/start").status_code == 409
    done = wait_for(lambda: http.get(f"/v1/fine_tuning/jobs/{job['id']}").json(),
                    lambda j: j["status"] in ("SUCCESS", "FAILED", "CANCELLED"))
    assert done["status"] == "SUCCESS", done
    assert done["checkpoints"][0]["step_number"] == 3 and done["checkpoints"][0]["metrics"]["valid_loss"] > 0
    statuses = [e["data"]["status"] for e in done["events"] if e["name"] == "status-updated"]
    assert statuses == ["VALIDATING", "VALIDATED", "QUEUED", "RUNNING", "SUCCESS"]
    listed = http.get("/v1/fine_tuning/jobs", params={"page": 0, "page_size": 1000, "status": "SUCCESS"}).json()
    assert listed["object"] == "list" and done["id"] in [j["id"] for j in listed["data"]]
    assert listed["total"] == len(listed["data"])
    model = done["fine_tuned_model"]
    # the Mistral model routes: rename, archive (not served), unarchive (served again)
    card = http.patch(f"/v1/fine_tuning/models/{model}", json={"name": "Bread", "description": "knows items"}).json()
    assert card["name"] == "Bread" and card["description"] == "knows items" and card["job"] == done["id"]
    assert http.post(f"/v1/fine_tuning/models/{model}/archive").json() == {"id": model, "object": "model",
                                                                          "archived": True}
    chat = {"model": model, "messages": [{"role": "user", "content": "What is item 1?"}], "max_tokens": 3}
    assert http.post("/v1/chat/completions", json=chat).status_code == 404
    assert http.get(f"/v1/models/{model}").json()["archived"] is True
    assert http.delete(f"/v1/fine_tuning/models/{model}/archive").json()["archived"] is False
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    assert http.delete(f"/v1/models/{model}").json() == {"id": model, "object": "model", "deleted": True}


# ------------------------------------------------------------------ cancel, pause, resume


def test_cancel_and_pause_at_every_status(live, oai, http, train_file):
    # A long job holds the only worker slot (--max-running-jobs 1): the next one stays queued.
    long = openai_job(oai, train_file.id, steps=400, suffix="long")
    wait_for(lambda: oai.fine_tuning.jobs.retrieve(long.id), lambda j: j.status == "running")
    queued = openai_job(oai, train_file.id, steps=2, suffix="q")
    time.sleep(1.5)
    assert oai.fine_tuning.jobs.retrieve(queued.id).status == "queued"
    assert oai.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    validated = http.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_files": [{"file_id": train_file.id}],
                                                        "hyperparameters": {"training_steps": 2, "seq_len": 128},
                                                        "auto_start": False}).json()
    assert http.post(f"/v1/fine_tuning/jobs/{validated['id']}/cancel").json()["status"] == "CANCELLED"
    # the file a job still reads cannot be deleted
    r = http.delete(f"/v1/files/{train_file.id}")
    assert r.status_code == 409 and long.id in r.json()["error"]["message"]
    # running -> cancellation requested -> cancelled by the worker at its next step
    wait_for(lambda: oai.fine_tuning.jobs.checkpoints.list(long.id).data, bool)
    mistral_view = http.post(f"/v1/fine_tuning/jobs/{long.id}/cancel", headers=MISTRAL_UA).json()
    assert mistral_view["status"] in ("CANCELLATION_REQUESTED", "CANCELLED")
    done = wait_for(lambda: http.get(f"/v1/fine_tuning/jobs/{long.id}", headers=MISTRAL_UA).json(),
                    lambda j: j["status"] == "CANCELLED", timeout=60)
    assert done["fine_tuned_model"] is None
    assert oai.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        oai.fine_tuning.jobs.cancel(long.id)
    # pause a running job: it stops after a checkpoint; resume: it goes on from there
    job = openai_job(oai, train_file.id, steps=60, suffix="p")
    wait_for(lambda: oai.fine_tuning.jobs.checkpoints.list(job.id).data, bool)
    oai.fine_tuning.jobs.pause(job.id)
    paused = wait_for(lambda: oai.fine_tuning.jobs.retrieve(job.id), lambda j: j.status == "paused", timeout=60)
    step = oai.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    assert 0 < step < 60 and paused.fine_tuned_model is None
    assert oai.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    done = wait_for(lambda: oai.fine_tuning.jobs.retrieve(job.id), lambda j: j.status in OPENAI_DONE)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in oai.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert "Training 60 steps of 128 tokens, resuming from its last checkpoint" in messages
    steps = [e.data["step"] for e in oai.fine_tuning.jobs.list_events(job.id, limit=1000) if e.type == "metrics"]
    assert sorted(set(steps)) == list(range(1, 61))  # every step trained once, none twice after the resume
    assert len(steps) == 60


def test_hostile_inputs_get_clear_4xx(live, oai, http, train_file):
    too_many = [{"file_id": train_file.id}] * 101
    r = http.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_files": too_many,
                                                "hyperparameters": {"training_steps": 1}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "training_files"
    deep = {"model": MODEL, "training_file": train_file.id, "metadata": {"a": "b"}}
    for _ in range(200):
        deep = {"x": deep}
    r = http.post("/v1/fine_tuning/jobs", json=deep)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    r = http.post("/v1/fine_tuning/jobs", content=b"{\"model\": ", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = http.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": train_file.id,
                                                "metadata": {f"k{i}": "v" for i in range(17)}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    for bad_id in ("../../etc/passwd", "%2e%2e%2f", "x" * 5000, "\u202e%00"):
        # (httpx resolves the dots itself: /v1/files/../ is /v1/, which redirects)
        assert http.get(f"/v1/files/{bad_id}").status_code in (404, 400, 307)
        assert http.get(f"/v1/fine_tuning/jobs/{bad_id}/events").status_code in (404, 400, 307)
    r = http.post("/v1/files", files=[("file", ("a.jsonl", jsonl(CONVERSATIONS))), ("file", ("b.jsonl", b"{}"))],
                  data={"purpose": "fine-tune"})
    assert r.status_code == 400
    r = http.post("/v1/files", files={"file": ("../../../evil.jsonl", jsonl(CONVERSATIONS))},
                  data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["filename"] == "evil.jsonl"
    assert not (live.data.parent / "evil.jsonl").exists()
    assert http.delete(f"/v1/files/{r.json()['id']}").json()["deleted"] is True
    r = http.post("/v1/files", files={"file": ("u.jsonl", b'{"messages": [{"role": "user", "content": "\\ud800"}, '
                                                          b'{"role": "assistant", "content": "x"}]}\n')},
                  data={"purpose": "fine-tune"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
