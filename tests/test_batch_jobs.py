"""Batch jobs through the HTTP server, end to end: OpenAI's ``/v1/batches`` with the
``openai`` client, Mistral's ``/v1/batch/jobs`` with httpx and the ``mistralai`` client,
on a tiny random model (and one of its adapters) run by the server's own engine.

Each line is answered as its route answers the same body (checked by sending it to the
route too); bad lines become error lines with the route's 4xx; a job can be cancelled
at every status; a server stopped mid-batch leaves a journal that the next server over
the same data directory goes on from, running no answered line again.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from mistralai.client import Mistral
from test_multi_lora import make_adapter
from test_server import LiveServer, wait_idle

from galerne import LLM
from galerne.config import ServerSettings
from galerne.errors import InvalidParameter
from galerne.platform import batches as b
from galerne.platform.files import write_file
from galerne.platform.store import Store, jobs
from galerne.server import create_app

KEY = "batch-key"
MODEL = "tiny-mistral"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENDED_OPENAI = ("completed", "failed", "expired", "cancelled")
ENDED_MISTRAL = ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED")


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return tiny_factory("mistral")[0]


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    adapter = make_adapter(tiny, tmp_path_factory.mktemp("adapters") / "a", 4, ("wq", "wo", "w2"), "peft", seed=1)
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.02, block_size=16, max_loras=2, max_lora_rank=8)
    settings = ServerSettings(api_key=[KEY], served_model_name=[MODEL], lora=[f"a={adapter}"], batch_concurrency=2,
                              data_dir=str(tmp_path_factory.mktemp("batch-data")))
    with LiveServer(create_app(llm, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def mis(live):
    return Mistral(api_key=KEY, server_url=live.url)


def chat(i: int, model: str | None = MODEL, max_tokens: int = 4, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": f"Hello number {i}"}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return body if model is None else {"model": model, **body}


def openai_line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(state, lines: list, purpose: str = "batch") -> str:
    """An input file (the Files API is another route's: written as it would store one)."""
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    return write_file(state.platform, data, filename="in.jsonl", purpose=purpose)["id"]


def read_file(state, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in state.platform.data.file(file_id).read_text().splitlines()]


def wait_openai(oai, batch_id: str, until=ENDED_OPENAI, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        batch = oai.batches.retrieve(batch_id)
        if (batch.status in until if isinstance(until, tuple) else until(batch)) or time.monotonic() > deadline:
            return batch
        time.sleep(0.05)


def mistral_get(live, job_id: str, **params) -> httpx.Response:
    return httpx.get(f"{live.url}/v1/batch/jobs/{job_id}", params=params, headers=AUTH, timeout=30)


def wait_mistral(live, job_id: str, until=ENDED_MISTRAL, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = mistral_get(live, job_id).json()
        if (job["status"] in until if isinstance(until, tuple) else until(job)) or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def route(live, path: str, body, dialect: str) -> httpx.Response:
    """What the route itself answers to ``body`` in ``dialect``."""
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(live.url + path, content=content, timeout=60,
                      headers=AUTH | {"X-Galerne-Dialect": dialect, "Content-Type": "application/json"})


# ------------------------------------------------------------------ OpenAI


def test_openai_batch_answers_each_line_as_the_route(live, oai):
    bodies = {"base": chat(0), "adapter": chat(1, model="a"), "sampled": chat(2, temperature=1.0, n=2, seed=7),
              "tools": chat(3, max_tokens=6, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])}
    data = "".join(json.dumps(openai_line(k, v)) + "\n" for k, v in bodies.items()).encode()
    file_id = oai.files.create(file=("requests.jsonl", data), purpose="batch").id
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"team": "search"})
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 4
    assert batch.id.startswith("batch_") and batch.input_file_id == file_id and batch.metadata == {"team": "search"}
    batch = wait_openai(oai, batch.id)
    assert batch.status == "completed" and batch.error_file_id is None and batch.model == MODEL  # its first line's
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 4, 0)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at >= batch.created_at
    output = oai.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output" and output.filename == f"{batch.id}_output.jsonl"
    lines = {x["custom_id"]: x for x in map(json.loads, oai.files.content(batch.output_file_id).text.splitlines())}
    assert set(lines) == set(bodies)
    for custom_id, line in lines.items():
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        answer, direct = response["body"], route(live, "/v1/chat/completions", bodies[custom_id], "openai").json()
        assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
        # The route's answer: the same fields, the same greedy text (and seeded draws), the same
        # usage (but the prefix cache's hits: the route's request finds the batch's prompt).
        assert answer.keys() == direct.keys() and answer["model"] == bodies[custom_id]["model"]
        assert [c["message"] for c in answer["choices"]] == [c["message"] for c in direct["choices"]]
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert answer["usage"][key] == direct["usage"][key]
    assert lines["adapter"]["response"]["body"]["choices"][0]["message"] != lines["base"]["response"]["body"][
        "choices"][0]["message"]  # the adapter ran (another prompt, but also other weights)
    assert batch.usage.input_tokens == sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in lines.values())
    assert batch.usage.output_tokens == sum(x["response"]["body"]["usage"]["completion_tokens"] for x in lines.values())
    assert oai.batches.retrieve(batch.id).status == "completed"
    assert batch.id in [x.id for x in oai.batches.list(limit=100).data]


def test_openai_completions_batch_and_list_pages(live, oai):
    bodies = {f"c{i}": {"model": MODEL, "prompt": f"Once upon a time {i}", "max_tokens": 3, "temperature": 0}
              for i in range(3)}
    file_id = upload(live.state, [openai_line(k, v, "/v1/completions") for k, v in bodies.items()])
    batch = wait_openai(oai, oai.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                                                completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    for line in read_file(live.state, batch.output_file_id):
        direct = route(live, "/v1/completions", bodies[line["custom_id"]], "openai").json()
        assert line["response"]["body"]["object"] == "text_completion"
        assert line["response"]["body"]["choices"] == direct["choices"]
    everything = oai.batches.list(limit=100)
    ids = [x.id for x in everything.data]
    assert batch.id in ids and not everything.has_more and len(ids) >= 2
    assert [x.created_at for x in everything.data] == sorted((x.created_at for x in everything.data), reverse=True)
    first = oai.batches.list(limit=1)
    assert len(first.data) == 1 and first.has_more and first.last_id == ids[0]
    second = oai.batches.list(limit=1, after=first.last_id)
    assert second.data[0].id == ids[1]


def test_bad_lines_become_error_lines_with_the_routes_answer(live, oai):
    long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4}
    bad = {  # custom_id -> the body the route refuses
        "bad-type": chat(1, max_tokens="4"),
        "bad-model": chat(2, model="gpt-9"),
        "adapter-gone": chat(3, model="nope"),
        "empty": {"model": MODEL, "messages": []},
        "too-long": long,
        "logprobs": chat(4, top_logprobs=99),
    }
    lines = [openai_line("good", chat(0)), *[openai_line(k, v) for k, v in bad.items()],
             "not json", "[1, 2]", {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"},
             openai_line("wrong-url", chat(5), url="/v1/completions"),
             openai_line("stream", chat(6, stream=True))]
    batch = wait_openai(oai, oai.batches.create(input_file_id=upload(live.state, lines),
                                                endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "completed"  # bad lines never fail the job
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (12, 1, 11)
    assert [x["custom_id"] for x in read_file(live.state, batch.output_file_id)] == ["good"]
    errors = read_file(live.state, batch.error_file_id)
    by_id = {x["custom_id"]: x for x in errors}
    for custom_id, body in bad.items():
        direct = route(live, "/v1/chat/completions", body, "openai")
        line = by_id[custom_id]
        assert direct.status_code >= 400 and line["response"]["status_code"] == direct.status_code, custom_id
        assert line["response"]["body"] == direct.json(), custom_id
        assert line["error"] == {"code": direct.json()["error"]["code"], "message": direct.json()["error"]["message"]}
    assert by_id["bad-model"]["response"]["status_code"] == 404
    assert by_id["too-long"]["error"]["code"] == "context_length_exceeded"
    unnamed = [x for x in errors if x["custom_id"] is None]  # the lines with no readable custom_id
    assert sorted(x["response"]["body"]["error"]["message"].split(":")[0] for x in unnamed) == ["body", "body"]
    assert "malformed JSON" in unnamed[0]["response"]["body"]["error"]["message"] + unnamed[1]["response"]["body"]["error"]["message"]
    assert by_id["no-body"]["response"]["body"]["error"]["param"] == "body"
    assert by_id["wrong-url"]["response"]["body"]["error"]["param"] == "url"
    assert by_id["stream"]["response"]["body"]["error"]["param"] == "stream"
    assert all(x["response"]["status_code"] == 400 for x in errors if x["custom_id"] in (None, "no-body", "wrong-url"))


# ------------------------------------------------------------------ Mistral


def test_mistral_batch_inline_requests(live):
    requests = [{"custom_id": "base", "body": chat(0, model=None)}, {"custom_id": "adapter", "body": chat(1, model="a")},
                {"custom_id": "bad", "body": chat(2, model=None, max_tokens=-1)}]
    r = httpx.post(live.url + "/v1/batch/jobs", headers=AUTH, timeout=30, json={
        "endpoint": "/v1/chat/completions", "model": MODEL, "requests": requests, "metadata": {"run": "inline"}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "batch" and job["status"] in ("QUEUED", "RUNNING") and job["total_requests"] == 3
    assert job["model"] == MODEL and job["metadata"] == {"run": "inline"} and len(job["input_files"]) == 1
    job = wait_mistral(live, job["id"])
    assert job["status"] == "SUCCESS"
    assert (job["completed_requests"], job["succeeded_requests"], job["failed_requests"]) == (3, 2, 1)
    assert job["errors"] == [{"message": "max_tokens: Input should be greater than or equal to 1", "count": 1}]
    outputs = {x["custom_id"]: x for x in read_file(live.state, job["output_file"])}
    for custom_id in ("base", "adapter"):
        line = outputs[custom_id]
        assert line["error"] is None and line["response"]["status_code"] == 200 and "request_id" not in line["response"]
        body = next(q["body"] for q in requests if q["custom_id"] == custom_id)
        direct = route(live, "/v1/chat/completions", {"model": MODEL, **body}, "mistral").json()
        assert line["response"]["body"]["choices"][0]["message"] == direct["choices"][0]["message"]
        assert line["response"]["body"]["model"] == body.get("model", MODEL)
    (error,) = read_file(live.state, job["error_file"])
    direct = route(live, "/v1/chat/completions", {"model": MODEL, **requests[2]["body"]}, "mistral")
    assert error["custom_id"] == "bad" and error["response"] == {"status_code": 422, "body": direct.json()}
    assert direct.status_code == 422 and direct.json()["detail"][0]["loc"] == ["body", "max_tokens"]
    inline = mistral_get(live, job["id"], inline="true").json()
    assert sorted(x["custom_id"] for x in inline["outputs"]) == ["adapter", "base"]
    assert mistral_get(live, job["id"]).json()["outputs"] is None


def test_inline_requests_may_hold_more_text_than_one_prompt(live):
    # 40 requests of 300 characters: more text in all than the context (512 tokens) could hold
    # in one request (8,192 characters); each fits, and is checked when it runs.
    requests = [{"custom_id": str(i), "body": {"messages": [{"role": "user", "content": f"{i} " + "word " * 60}],
                                               "max_tokens": 1}} for i in range(40)]
    r = httpx.post(live.url + "/v1/batch/jobs", headers=AUTH, timeout=30, json={
        "endpoint": "/v1/chat/completions", "model": MODEL, "requests": requests})
    assert r.status_code == 200, r.text
    job = wait_mistral(live, r.json()["id"])
    assert job["status"] == "SUCCESS" and job["succeeded_requests"] == 40


def test_mistral_client_fim_batch_and_list_filters(live, mis):
    lines = [{"custom_id": f"f{i}", "body": {"prompt": f"def f{i}(x):\n    return ", "suffix": "\n", "max_tokens": 3,
                                             "temperature": 0}} for i in range(2)]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file_id = mis.files.upload(file={"file_name": "fim.jsonl", "content": data}, purpose="batch").id
    job = mis.batch.jobs.create(endpoint="/v1/fim/completions", input_files=[file_id], model=MODEL,
                                metadata={"team": "fim"}, timeout_hours=2)
    assert job.status in ("QUEUED", "RUNNING") and job.input_files == [file_id]
    job = wait_mistral(live, job.id)
    assert job["status"] == "SUCCESS" and job["succeeded_requests"] == 2
    output = mis.files.download(file_id=job["output_file"]).read().decode()
    for line in map(json.loads, output.splitlines()):
        body = next(x["body"] for x in lines if x["custom_id"] == line["custom_id"])
        direct = route(live, "/v1/fim/completions", {"model": MODEL, **body}, "mistral").json()
        assert line["response"]["body"]["choices"][0]["message"] == direct["choices"][0]["message"]
    got = mis.batch.jobs.get(job_id=job["id"])
    assert got.status == "SUCCESS" and got.output_file == job["output_file"] and got.endpoint == "/v1/fim/completions"
    found = mis.batch.jobs.list(metadata={"team": "fim"}, status=["SUCCESS"])
    assert found.total == 1 and found.data[0].id == job["id"]
    assert mis.batch.jobs.list(metadata={"team": "nobody"}).total == 0
    assert mis.batch.jobs.list(status=["QUEUED"]).total == 0
    everything = mis.batch.jobs.list(page_size=100)
    assert everything.total >= 2 and len(mis.batch.jobs.list(page=1, page_size=1).data) == 1
    assert mis.batch.jobs.list(model=MODEL).total >= 1
    r = httpx.get(live.url + "/v1/batch/jobs", params={"metadata": json.dumps({"team": "fim"}),
                                                       "created_after": "2000-01-01T00:00:00Z"}, headers=AUTH)
    assert r.json()["total"] == 1
    r = httpx.get(live.url + "/v1/batch/jobs", params={"created_after": time.time() + 3600}, headers=AUTH)
    assert r.json() == {"data": [], "object": "list", "total": 0}


# ------------------------------------------------------------------ refusals


def test_create_refusals_name_the_field(live, oai):
    good = upload(live.state, [openai_line("x", chat(0))])
    with pytest.raises(openai.BadRequestError) as e:
        oai.batches.create(input_file_id=good, endpoint="/v1/embeddings", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    assert "'/v1/chat/completions' or '/v1/completions'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.batches.create(input_file_id=good, endpoint="/v1/chat/completions", completion_window="48h")
    assert e.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError) as e:
        oai.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.body["param"] == "input_file_id"
    for file_id in (upload(live.state, [openai_line("x", chat(0))], purpose="fine-tune"), upload(live.state, ["", " "])):
        with pytest.raises(openai.BadRequestError) as e:
            oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert e.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as e:
        oai.batches.create(input_file_id=good, endpoint="/v1/chat/completions", completion_window="24h",
                           metadata={f"k{i}": "v" for i in range(17)})
    assert e.value.body["param"] == "metadata"

    def mistral(body: dict) -> httpx.Response:
        return httpx.post(live.url + "/v1/batch/jobs", json=body, headers=AUTH, timeout=30)

    requests = [{"custom_id": "1", "body": chat(0)}]
    for body, field in (({"endpoint": "/v1/ocr", "requests": requests}, "endpoint"),
                        ({"endpoint": "/v1/chat/completions"}, "input_files"),
                        ({"endpoint": "/v1/chat/completions", "requests": requests, "input_files": [good]}, "input_files"),
                        ({"endpoint": "/v1/chat/completions", "requests": requests, "agent_id": "ag"}, "agent_id"),
                        ({"endpoint": "/v1/chat/completions", "requests": requests, "timeout_hours": 0}, "timeout_hours"),
                        ({"endpoint": "/v1/chat/completions", "requests": [{"custom_id": "1"}]}, "requests")):
        r = mistral(body)
        assert r.status_code == 422 and r.json()["object"] == "error", body
        assert r.json()["detail"][0]["loc"][:2] == ["body", field], r.json()
    r = mistral({"endpoint": "/v1/ocr", "requests": requests})
    assert "/v1/fim/completions" in r.json()["message"]
    r = mistral({"endpoint": "/v1/chat/completions", "requests": requests, "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["code"] == "model_not_found"
    r = mistral({"endpoint": "/v1/chat/completions", "input_files": [good, "file-nope"]})
    assert r.status_code == 404 and r.json()["param"] == "input_files[1]"
    assert httpx.post(live.url + "/v1/batch/jobs", json={}, timeout=30).status_code == 401  # an API key, as everywhere


def test_unknown_ids_are_404_in_each_dialect(live, oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.batches.retrieve("batch_nope")
    assert e.value.body["code"] == "batch_not_found" and "batch_nope" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.batches.cancel("batch_nope")
    for method, path in (("GET", "/v1/batch/jobs/nope"), ("POST", "/v1/batch/jobs/nope/cancel"),
                         ("DELETE", "/v1/batch/jobs/nope")):
        r = httpx.request(method, live.url + path, headers=AUTH, timeout=30)
        assert r.status_code == 404 and r.json()["object"] == "error" and "nope" in r.json()["message"]


# ------------------------------------------------------------------ cancel, expiry, bounds


def long_lines(n: int, dialect: str = "openai") -> list[dict]:
    """Requests long enough (100 tokens each) for a job to be caught running."""
    bodies = [chat(i, max_tokens=100, ignore_eos=True) for i in range(n)]
    return [openai_line(f"r{i}", x) if dialect == "openai" else {"custom_id": f"r{i}", "body": x}
            for i, x in enumerate(bodies)]


def test_cancel_at_every_status(live, oai):
    state = live.state
    running = oai.batches.create(input_file_id=upload(state, long_lines(40)), endpoint="/v1/chat/completions",
                                 completion_window="24h")
    running = wait_openai(oai, running.id, lambda x: x.request_counts.completed >= 1)
    assert running.status == "in_progress"
    with pytest.raises(openai.ConflictError) as e:  # the files API keeps a running job's input
        oai.files.delete(running.input_file_id)
    assert e.value.body["code"] == "file_in_use"
    # Three jobs queued behind it (one job runs at a time).
    queued = oai.batches.create(input_file_id=upload(state, long_lines(2)), endpoint="/v1/chat/completions",
                                completion_window="24h")
    mistral_queued = httpx.post(live.url + "/v1/batch/jobs", headers=AUTH, json={
        "endpoint": "/v1/chat/completions", "requests": long_lines(2, "mistral")}).json()
    late = oai.batches.create(input_file_id=upload(state, long_lines(3)), endpoint="/v1/chat/completions",
                              completion_window="24h")
    state.platform.store.update("jobs", late.id, expires_at=int(time.time()) - 1)  # its window passes in the queue
    assert {queued.status, late.status, mistral_queued["status"]} == {"validating", "QUEUED"}

    # queued: cancelled at once, in either dialect
    cancelled = oai.batches.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.output_file_id is None
    r = httpx.post(f"{live.url}/v1/batch/jobs/{mistral_queued['id']}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "CANCELLED"

    # running: cancelling, then cancelled with the answers so far; nothing left in the engine
    cancelling = oai.batches.cancel(running.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_openai(oai, running.id)
    assert done.status == "cancelled" and done.cancelled_at and done.completed_at is None
    answered = read_file(state, done.output_file_id)
    assert 1 <= len(answered) == done.request_counts.completed < 40 and done.error_file_id is None
    assert oai.batches.cancel(running.id).status == "cancelled"  # again: as it is

    # expired in the queue: every request is an error line, batch_expired
    late = wait_openai(oai, late.id)
    assert late.status == "expired" and late.expired_at and late.output_file_id is None
    errors = read_file(state, late.error_file_id)
    assert sorted(x["custom_id"] for x in errors) == ["r0", "r1", "r2"]
    assert all(x["response"] is None and x["error"]["code"] == "batch_expired" for x in errors)
    assert mistral_get(live, late.id).json()["status"] == "TIMEOUT_EXCEEDED"
    with pytest.raises(openai.ConflictError):  # ended: nothing to cancel
        oai.batches.cancel(late.id)
    assert oai.batches.retrieve(queued.id).status == "cancelled"  # never ran
    wait_idle(state)

    # Mistral, running: CANCELLATION_REQUESTED, then CANCELLED; an ended job can be deleted
    job = httpx.post(live.url + "/v1/batch/jobs", headers=AUTH, json={
        "endpoint": "/v1/chat/completions", "model": MODEL, "requests": long_lines(40, "mistral")}).json()
    wait_mistral(live, job["id"], lambda x: x["completed_requests"] >= 1)
    r = httpx.delete(f"{live.url}/v1/batch/jobs/{job['id']}", headers=AUTH)
    assert r.status_code == 409
    r = httpx.post(f"{live.url}/v1/batch/jobs/{job['id']}/cancel", headers=AUTH)
    assert r.json()["status"] in ("CANCELLATION_REQUESTED", "CANCELLED")
    job = wait_mistral(live, job["id"])
    assert job["status"] == "CANCELLED" and 1 <= job["succeeded_requests"] < 40 and job["completed_at"]
    r = httpx.delete(f"{live.url}/v1/batch/jobs/{job['id']}", headers=AUTH)
    assert r.json() == {"id": job["id"], "object": "batch", "deleted": True}
    assert mistral_get(live, job["id"]).status_code == 404
    wait_idle(state)


def test_a_batch_holds_a_bounded_number_of_engine_requests_and_no_queue_seat(live, oai):
    state = live.state
    lines = [openai_line(f"s{i}", chat(i, max_tokens=6, ignore_eos=True)) for i in range(24)]
    batch = oai.batches.create(input_file_id=upload(state, lines), endpoint="/v1/chat/completions",
                               completion_window="24h")
    most, seats = 0, 0
    while (b_ := oai.batches.retrieve(batch.id)).status not in ENDED_OPENAI:
        stats = state.engine.stats()
        most, seats = max(most, stats["running"] + stats["waiting"]), max(seats, state.queued)
        # An interactive request meanwhile: served, at priority over the batch.
        assert oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2).usage.completion_tokens >= 1
    assert b_.status == "completed" and b_.request_counts.completed == 24
    assert 1 <= most <= 2 + 1  # batch_concurrency, and the interactive request
    assert seats == 0  # between interactive requests: the batch's hold no seat of max_queued_requests


# ------------------------------------------------------------------ restart


def test_a_server_restarted_mid_batch_goes_on_where_it_stopped(tiny, tmp_path):
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.02, block_size=16)
    settings = ServerSettings(api_key=[KEY], served_model_name=[MODEL], batch_concurrency=1, data_dir=str(tmp_path))
    lines = [openai_line(f"r{i}", chat(i, max_tokens=100, ignore_eos=True)) for i in range(14)]
    with LiveServer(create_app(llm, settings)) as first:
        client = openai.OpenAI(base_url=first.url + "/v1", api_key=KEY, max_retries=0)
        batch = client.batches.create(input_file_id=upload(first.state, lines), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        path = tmp_path / "jobs" / batch.id / "journal.jsonl"
        deadline = time.monotonic() + 30
        while not (path.exists() and path.read_bytes().count(b"\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.01)
    # Stopped: the job is left running, with no owner, and a journal of what was answered.
    store = Store(f"sqlite:///{tmp_path / 'galerne.db'}")
    record = b.get(store, batch.id)
    assert record["status"] == b.RUNNING and record["owner"] is None
    journal = [json.loads(x) for x in path.read_text().splitlines()]
    before = {x["line"]["custom_id"]: x["line"]["id"] for x in journal}
    assert 3 <= len(before) < 14 and record["succeeded"] == len(before)

    with LiveServer(create_app(llm, settings)) as second:
        client = openai.OpenAI(base_url=second.url + "/v1", api_key=KEY, max_retries=0)
        done = wait_openai(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 14
        out = read_file(second.state, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"r{i}" for i in range(14))  # each once
    after = {x["custom_id"]: x["id"] for x in out}
    assert all(after[k] == v for k, v in before.items())  # the answered lines were not run again
    assert not (tmp_path / "jobs" / batch.id).exists()  # the journal goes with the job's end
    store.close()


# ------------------------------------------------------------------ the pieces


def test_journal_drops_a_torn_last_line(tmp_path):
    journal = b.Journal(tmp_path / "j")
    assert journal.open().done == set()
    journal.append(0, True, {"custom_id": "a", "response": {"body": {"usage": {"prompt_tokens": 5}}}})
    journal.append(3, False, {"custom_id": "b", "error": {"message": "bad"}})
    journal.close()
    with open(journal.path, "ab") as f:
        f.write(b'{"i": 4, "ok": tr')  # a crash in the middle of a line
    progress = b.Journal(tmp_path / "j").open()
    assert progress.done == {0, 3} and (progress.succeeded, progress.failed) == (1, 1)
    assert progress.usage["input_tokens"] == 5 and progress.line_errors == {"bad": 1}
    assert journal.path.read_bytes().endswith(b"}\n")


def test_taking_a_job_is_a_compare_and_set(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    b.create(store, job_id="j1", dialect="openai", endpoint="/v1/chat/completions", input_file_ids=[], total=1, base="m")
    assert b.next_job(store, "batch:h:1:a", "other-base") is None  # a job for another model
    job = b.next_job(store, "batch:h:1:a", "m")
    assert job["status"] == b.RUNNING and job["owner"] == "batch:h:1:a"
    assert b.next_job(store, "batch:h:1:b", "m") is None  # alive on another host: not taken
    assert not b.take(store, "j1", owner="batch:h:1:b", previous=None)  # not free
    assert b.take(store, "j1", owner=None, previous="batch:h:1:a")  # handed back
    assert b.next_job(store, "batch:h:1:b", "m")["owner"] == "batch:h:1:b"
    # A silent runner of another host loses it after STALE_S.
    with store.engine.begin() as c:
        c.execute(jobs.update().values(heartbeat=time.time() - b.STALE_S - 1))
    assert b.orphaned(b.get(store, "j1"))
    assert b.next_job(store, "batch:h:2:c", "m")["owner"] == "batch:h:2:c"
    store.close()


def test_batch_concurrency_is_checked():
    with pytest.raises(InvalidParameter) as e:
        ServerSettings(batch_concurrency=0)
    assert e.value.field == "batch_concurrency"
