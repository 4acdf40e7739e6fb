"""The console (galerne/server/console): the page and its headers, the validation route it
uses (``POST /v1/files/validate``), and the page itself in a real Chromium driven by
Playwright, against a live server of the built-in galerne-mini with an API key: chat streams
and stops (the server cancels the request), compare shows two answers, a bad JSONL shows its
line errors and is not stored, untrusted text stays text, a phone-sized screen does not
scroll sideways, and (slow) a fine-tuning job on the bakery data runs to success with its
chart updating, after which the new model answers in the chat.

The browser tests skip, with the reason, without the ``playwright`` package or a Chromium
(Debian's ``chromium``; another one: ``GALERNE_CHROMIUM=/path``). Playwright's own browser
download is never used. With ``GALERNE_CONSOLE_SCREENSHOTS=FOLDER`` they save the screenshots
of docs/console.md there (scripts/console_screenshots.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from galerne import LLM
from galerne.config import ArgumentParser, ServerSettings, add_arguments, from_args
from galerne.server.app import create_app
from galerne.server.console import CSP
from test_server import LiveServer, wait_idle

KEY = "console-key"
BASE = "galerne-mini"
BAKERY = Path(__file__).resolve().parents[1] / "examples" / "bakery"
SHOTS = os.environ.get("GALERNE_CONSOLE_SCREENSHOTS")
XSS = "<img src=x onerror=window.__xss=1>"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

GOOD = [{"messages": [{"role": "user", "content": f"What is item {i}?"},
                      {"role": "assistant", "content": f"Item {i} is a loaf of bread."}]} for i in range(3)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# A file with a problem on lines 3 (not JSON), 4 (no assistant answer) and 6 (not UTF-8).
BAD = (jsonl(GOOD[:2]) + b"{not json\n" + jsonl([{"messages": [{"role": "user", "content": "x"}]}]) + jsonl(GOOD[2:])
       + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')


@pytest.fixture(scope="module")
def llm():
    return LLM(BASE, device="cpu", kv_cache_gb=0.1)


@pytest.fixture(scope="module")
def live(llm, tmp_path_factory):
    data = tmp_path_factory.mktemp("console-data")
    app = create_app(llm, ServerSettings(api_key=[KEY], data_dir=str(data)))
    with LiveServer(app) as server:
        server.data = data
        yield server


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def file_ids(http) -> set[str]:
    return {f["id"] for f in http.get("/v1/files").json()["data"]}


# ------------------------------------------------------------------ the page, without a browser


def test_the_page_is_served_without_a_key_with_a_strict_policy(live, http):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP and "default-src 'self'" in CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "console/app.js" in r.text and "http://" not in r.text and "https://" not in r.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        r = httpx.get(f"{live.url}/console/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert "https://" not in r.text and "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")
    assert httpx.head(live.url + "/").status_code == 200
    for bad in ("/console/nope.js", "/console/..%2f__init__.py", "/console/__init__.py"):
        assert httpx.get(live.url + bad).status_code == 404, bad
    assert httpx.get(live.url + "/v1/models").status_code == 401  # the API still needs the key
    assert "/" not in http.get("/openapi.json").json()["paths"]


def test_no_console_turns_it_off(llm, tmp_path):
    parser = ArgumentParser()
    add_arguments(parser, ServerSettings, env=False)
    settings = from_args(ServerSettings, parser.parse_args(["--no-console", "--data-dir", str(tmp_path)]))
    assert settings.console is False
    app = create_app(llm, settings)
    client = TestClient(app, base_url="http://localhost")  # no lifespan: no engine needed to route
    assert client.get("/").status_code == 404 and client.get("/console/app.js").status_code == 404


def test_validate_lists_every_problem_and_stores_nothing(live, http):
    before = file_ids(http)
    r = http.post("/v1/files/validate", files={"file": ("bad.jsonl", BAD)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["ok"] is False and v["num_lines"] == 6 and v["num_problems"] == 3 and v["details"] is None
    assert [p["line"] for p in v["problems"]] == [3, 4, 6]
    assert "bad JSON" in v["problems"][0]["reason"] and "not UTF-8" in v["problems"][2]["reason"]
    r = http.post("/v1/files/validate", files={"file": ("empty.jsonl", b"")}, data={"purpose": "fine-tune"})
    assert r.json()["ok"] is False and "empty" in r.json()["error"]
    r = http.post("/v1/files/validate", files={"file": ("b.jsonl", b'{"body": 1}\n')}, data={"purpose": "batch"})
    assert r.json()["problems"][0]["line"] == 1
    r = http.post("/v1/files/validate", files={"file": ("good.jsonl", jsonl(GOOD))}, data={"purpose": "fine-tune"})
    v = r.json()
    assert v["ok"] is True and v["problems"] == [] and v["details"]["num_lines"] == 3 and v["details"]["tokens"] > 0
    r = http.post("/v1/files/validate", files={"file": ("a.jsonl", jsonl(GOOD))}, data={"purpose": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    assert httpx.post(live.url + "/v1/files/validate", files={"file": ("a.jsonl", b"")},
                      data={"purpose": "batch"}).status_code == 401
    assert file_ids(http) == before
    assert list((live.data / "tmp").iterdir()) == []
    # the upload's refusal is the same check's
    r = http.post("/v1/files", files={"file": ("bad.jsonl", BAD)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and "line 3: bad JSON" in r.json()["error"]["message"]


# ------------------------------------------------------------------ the browser


def chromium_path() -> str | None:
    given = os.environ.get("GALERNE_CHROMIUM")
    if given:
        return given
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright; its browser download is "
                    "not needed: Debian's chromium is used)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium to drive: install Debian's chromium package, or set GALERNE_CHROMIUM=/path")
    manager = sync_playwright().start()
    try:
        try:
            browser = manager.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        except Exception as e:
            pytest.skip(f"Chromium ({path}) does not start: {str(e).splitlines()[0]}")
        yield browser
        browser.close()
    finally:
        manager.stop()


@pytest.fixture
def page(browser, live):
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # (an answer of 4xx is logged as "Failed to load resource": the tests ask for some)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error"
            and not m.text.startswith("Failed to load resource") else None)
    # Outside requests would fail here (no network) and are forbidden by the policy: none may be made.
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(live.url) else None)
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert outside == []
    assert errors == []


def open_console(page, live, tab: str = "chat"):
    """The console at ``#tab``; it meets the 401, asks for the key, and lists the models."""
    page.goto(f"{live.url}/#{tab}")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.fill("#key-input", KEY)
    page.keyboard.press("Enter")
    dialog.wait_for(state="hidden")
    page.wait_for_function("() => document.querySelectorAll('#chat-model option').length > 0")
    assert page.evaluate("sessionStorage.getItem('galerne.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0


def test_a_wrong_key_is_asked_again_and_a_key_can_be_forgotten(page, live):
    page.goto(live.url + "/")
    page.locator("#key-dialog").wait_for(state="visible")
    page.fill("#key-input", "wrong-key")
    page.click("#key-save")
    page.wait_for_function("() => document.querySelector('#key-reason').textContent.includes('invalid API key')")
    assert page.locator("#key-dialog").is_visible() and page.locator("#chat-model option").count() == 0
    page.fill("#key-input", KEY)
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#chat-model option').length > 0")
    assert text_of(page, "#server-status") == f"serving {BASE}"
    page.click("#key-button")
    page.click("#key-forget")
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    page.locator("#key-dialog").wait_for(state="visible")  # asked again: the key is gone


def shoot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


# The chat tests ask for long answers: this makes the page's requests keep going past EOS
# while window.__ignoreEos is set (a request extension the page itself never sends).
IGNORE_EOS = """
const fetch0 = window.fetch;
window.fetch = (url, init) => {
  if (window.__ignoreEos && String(url).endsWith('chat/completions') && init && init.body) {
    init = {...init, body: JSON.stringify({...JSON.parse(init.body), ignore_eos: true})};
  }
  return fetch0(url, init);
};
"""


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def metric(live, name: str) -> float:
    """A sample of the server's /metrics (the model's, unlabelled otherwise)."""
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def test_chat_streams_and_stop_cancels_on_the_server(page, live):
    page.add_init_script(IGNORE_EOS)
    open_console(page, live)
    generated = metric(live, "galerne_generation_tokens_total")
    state = live.state
    page.fill("#chat-system", "You are a helpful assistant.")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "1900")  # galerne-mini: a context of 2048
    page.evaluate("window.__ignoreEos = true")
    page.fill("#chat-input", "Tell me a very long story about bread.")
    page.keyboard.press("Enter")
    answer = page.locator("#chat-log .msg.assistant").last
    page.wait_for_function("() => document.querySelector('#chat-log .msg.assistant .text').textContent.length > 40")
    assert page.is_enabled("#chat-stop") and page.is_disabled("#chat-send")
    assert state.engine.stats()["running"] == 1
    stopped_at = time.monotonic()
    page.click("#chat-stop")
    page.wait_for_function("() => document.querySelector('#chat-log .msg.assistant').dataset.finish === 'stopped'")
    wait_idle(state, timeout=10)  # the server aborted the engine request: no token is made any more
    assert time.monotonic() - stopped_at < 10
    assert metric(live, "galerne_requests_in_flight") == 1  # this /metrics request: the stream is over
    assert metric(live, "galerne_generation_tokens_total") - generated < 1900 / 2  # far from the 1900 asked
    assert "stopped" in answer.locator(".stats").inner_text()
    shown = answer.locator(".text").inner_text()
    time.sleep(0.5)
    assert answer.locator(".text").inner_text() == shown
    assert page.is_enabled("#chat-send") and page.is_disabled("#chat-stop")

    # the next turn: a whole answer, with its token counts and speed
    page.evaluate("window.__ignoreEos = true")
    page.fill("#chat-max-tokens", "24")
    page.fill("#chat-input", "And a short one?")
    page.click("#chat-send")
    page.wait_for_function("() => document.querySelectorAll('#chat-log .msg.assistant.done').length === 2")
    stats = page.locator("#chat-log .msg.assistant").last.locator(".stats").inner_text()
    assert "24 completion tokens" in stats and "tokens/s" in stats and "finish: length" in stats, stats
    assert page.locator("#chat-log .msg.user").count() == 2


def compare(page, a: str, b: str, question: str, max_tokens: int) -> tuple[str, str]:
    """Ask ``question`` to models ``a`` and ``b`` side by side (greedy), on the Compare tab."""
    page.select_option("#compare-model-a", a)
    page.select_option("#compare-model-b", b)
    page.fill("#compare-temperature", "0")
    page.fill("#compare-max-tokens", str(max_tokens))
    page.fill("#compare-input", question)
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('.column .msg.assistant.done').length === 2")
    return tuple(text_of(page, f"#compare-{side} .msg.assistant .text") for side in "ab")


def test_compare_streams_two_answers_together(page, live):
    open_console(page, live, "compare")
    a, b = compare(page, BASE, BASE, "Hello! Who are you?", 32)
    assert a and a == b  # the same model, greedy: the same answer
    for side in "ab":
        assert "completion tokens" in text_of(page, f"#compare-{side} .msg.assistant .stats")
    assert page.is_enabled("#compare-send") and page.is_disabled("#compare-stop")


def test_a_bad_jsonl_shows_its_line_errors_and_is_not_stored(page, live, http):
    before = file_ids(http)
    open_console(page, live, "data")
    page.set_input_files("#upload-file", files=[{"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": BAD}])
    page.wait_for_selector("#validation.bad")
    summary = text_of(page, "#validation-summary")
    assert "3 of 6 lines cannot be used" in summary and "Nothing was stored" in summary
    lines = page.locator("#validation-problems li")
    assert [lines.nth(i).get_attribute("data-line") for i in range(lines.count())] == ["3", "4", "6"]
    assert "bad JSON" in lines.nth(0).inner_text() and "{not json" in lines.nth(0).inner_text()
    assert "not UTF-8" in lines.nth(2).inner_text()
    assert page.is_disabled("#upload-send")
    shoot(page, "data")
    assert file_ids(http) == before
    assert page.locator("#files-body tr").count() == len(before)

    # an empty file, then a good one: checked, then uploaded and listed
    page.set_input_files("#upload-file", files=[{"name": "empty.jsonl", "mimeType": "application/jsonl", "buffer": b""}])
    page.wait_for_function("() => document.querySelector('#validation-summary').textContent.includes('empty')")
    assert page.is_disabled("#upload-send")
    page.set_input_files("#upload-file", files=[{"name": "good.jsonl", "mimeType": "application/jsonl",
                                                 "buffer": jsonl(GOOD)}])
    page.wait_for_selector("#validation.ok")
    page.click("#upload-send")
    page.wait_for_function("() => document.querySelector('#validation-summary').textContent.includes('is stored as')")
    (new,) = file_ids(http) - before
    row = page.locator(f"#files-body tr[data-id='{new}']")
    row.wait_for()
    assert "good.jsonl" in row.inner_text()
    row.get_by_role("button", name="Delete good.jsonl").click()
    row.get_by_role("button", name="Delete good.jsonl").click()  # the second click confirms
    row.wait_for(state="detached")
    assert file_ids(http) == before


SSE_XSS = "".join(f"data: {json.dumps(c)}\n\n" for c in [
    {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                 "reasoning_content": XSS}}]},
    {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": XSS}}]},
    {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "abcdefghi", "type": "function", "function": {"name": XSS, "arguments": json.dumps({"q": XSS})}}]},
        "finish_reason": "tool_calls"}]},
    {"id": "x", "object": "chat.completion.chunk", "choices": [],
     "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}},
]) + "data: [DONE]\n\n"


def test_untrusted_text_is_shown_as_text(page, live, http):
    """A model's answer, thinking and tool call, and a file's name, holding HTML: shown, never run."""
    open_console(page, live)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=SSE_XSS))
    page.fill("#chat-input", "hi")
    page.keyboard.press("Enter")
    page.wait_for_selector("#chat-log .msg.assistant.done")
    answer = page.locator("#chat-log .msg.assistant")
    assert answer.locator(".text").inner_text() == XSS
    assert answer.locator("details.thinking pre").text_content() == XSS
    assert answer.locator(".tool-call .name").inner_text() == XSS
    assert XSS in answer.locator(".tool-call pre").inner_text()
    assert answer.locator("img").count() == 0
    assert "9 completion tokens" in answer.locator(".stats").inner_text()

    name = f"{XSS}.jsonl"
    record = http.post("/v1/files", files={"file": (name, jsonl(GOOD))}, data={"purpose": "fine-tune"}).json()
    try:
        page.click("#tab-data")
        row = page.locator(f"#files-body tr[data-id='{record['id']}']")
        row.wait_for()
        assert row.locator("td.name").inner_text() == name
        page.set_input_files("#upload-file", files=[{"name": name, "mimeType": "application/jsonl",
                                                     "buffer": jsonl(GOOD) + XSS.encode() + b"\n"}])
        page.wait_for_selector("#validation.bad")
        assert XSS in text_of(page, "#validation-summary") and XSS in text_of(page, "#validation-problems")
        page.click("#tab-finetune")
        assert name in page.locator("#ft-training").inner_text()
        assert page.locator("main img").count() == 0
        assert page.evaluate("window.__xss") is None
    finally:
        http.delete(f"/v1/files/{record['id']}")


def test_a_huge_prompt_is_refused_with_the_servers_reason(page, live):
    open_console(page, live)
    page.fill("#chat-input", "bread " * 40_000)  # 240,000 characters: more than a 2048-token context holds
    page.click("#chat-send")
    error = page.locator("#chat-log .msg.assistant .error")
    error.wait_for()
    assert "context" in error.inner_text(), error.inner_text()
    page.fill("#chat-input", "x" * (3 << 20))  # past --max-body-mb
    page.click("#chat-send")
    page.locator("#chat-log .msg.assistant .error").nth(1).wait_for()
    assert "--max-body-mb" in page.locator("#chat-log .msg.assistant .error").nth(1).inner_text()
    wait_idle(live.state)
    # neither is kept in the conversation: the next question goes alone
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=SSE_XSS if len(json.loads(route.request.post_data)["messages"]) == 1 else "data: {\"error\": {}}\n\n"))
    page.fill("#chat-input", "hi")
    page.click("#chat-send")
    page.wait_for_function("() => document.querySelectorAll('#chat-log .msg.assistant.done').length === 3")
    assert page.locator("#chat-log .msg.assistant").nth(2).locator(".error").is_hidden()


def test_without_an_api_key_the_page_works_from_loopback(browser, tmp_path):
    """The default `galerne serve`: no key, the loopback guard (Host, Origin) lets the page's own calls in."""
    llm = LLM(BASE, device="cpu", kv_cache_gb=0.05)
    app = create_app(llm, ServerSettings(data_dir=str(tmp_path)))
    with LiveServer(app) as server:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("() => document.querySelectorAll('#chat-model option').length > 0")
            assert page.locator("#key-dialog").is_hidden()
            page.fill("#chat-max-tokens", "8")
            page.fill("#chat-input", "Hello")
            page.keyboard.press("Enter")
            page.wait_for_selector("#chat-log .msg.assistant.done")
            assert "completion tokens" in text_of(page, "#chat-log .msg.assistant .stats")  # a POST, with an Origin
            page.click("#tab-data")
            page.set_input_files("#upload-file", files=[{"name": "good.jsonl", "mimeType": "application/jsonl",
                                                         "buffer": jsonl(GOOD)}])
            page.wait_for_selector("#validation.ok")
        finally:
            context.close()


def test_a_phone_sized_screen_does_not_scroll_sideways(browser, live):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        open_console(page, live)
        for tab in ("chat", "compare", "data", "finetune"):
            page.click(f"#tab-{tab}")
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), tab
        page.click("#tab-chat")
        assert page.locator("#chat-input").is_visible() and page.locator("#chat-send").is_visible()
        assert page.locator("#chat-max-tokens").is_hidden()  # the settings start folded on a phone
        page.click("#chat-settings-fold > summary")
        page.fill("#chat-max-tokens", "32")
        page.fill("#chat-temperature", "0")
        page.click("#chat-settings-fold > summary")
        page.fill("#chat-input", "Hello! Who are you?")
        page.click("#chat-send")
        page.wait_for_selector("#chat-log .msg.assistant.done")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        shoot(page, "phone")
    finally:
        context.close()


def test_keyboard_only_chat(page, live):
    open_console(page, live)
    page.fill("#chat-max-tokens", "8")
    page.locator("#tab-chat").focus()
    page.keyboard.press("ArrowRight")  # the tab list moves with the arrows
    assert page.evaluate("document.activeElement.id") == "tab-compare" and page.is_visible("#panel-compare")
    page.keyboard.press("ArrowLeft")
    assert page.is_visible("#panel-chat")
    page.locator("#chat-input").focus()
    page.keyboard.type("Hi")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("there")
    assert page.input_value("#chat-input") == "Hi\nthere"
    page.keyboard.press("Enter")
    page.wait_for_selector("#chat-log .msg.assistant.done")
    assert text_of(page, "#chat-log .msg.user .text") == "Hi\nthere"


# ------------------------------------------------------------------ fine-tuning


def test_a_job_refused_then_started_and_cancelled(page, live, http):
    record = http.post("/v1/files", files={"file": ("small.jsonl", jsonl(GOOD))}, data={"purpose": "fine-tune"}).json()
    try:
        open_console(page, live, "finetune")
        page.wait_for_function(f"() => document.querySelector('#ft-training option[value=\"{record['id']}\"]') !== null")
        page.select_option("#ft-training", record["id"])
        page.fill("#ft-steps", "1000")
        page.fill("#ft-rank", "100000")  # past the server's --max-lora-rank: its reason is shown
        page.click("#ft-create")
        error = page.locator("#ft-form-error")
        error.wait_for()
        assert "lora_rank" in error.inner_text() and page.locator("#job").is_hidden()
        page.fill("#ft-rank", "4")
        page.fill("#ft-seq-len", "128")
        page.click("#ft-create")
        page.wait_for_selector("#job:not([hidden])")
        assert error.is_hidden()
        page.click("#job-cancel")
        page.wait_for_function("() => document.querySelector('#job-status').textContent === 'cancelled'")
        assert page.locator("#job-cancel").is_hidden() and page.locator("#job-chat").is_hidden()
        job = page.locator("#jobs-list button[aria-current=true]")
        job.wait_for()
        job_id = job.locator(".id").inner_text()
        assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"
    finally:
        deadline = time.monotonic() + 60
        while http.delete(f"/v1/files/{record['id']}").status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.5)  # until its cancelled job's worker has stopped


# ------------------------------------------------------------------ fine-tuning (slow)


@pytest.mark.slow
def test_fine_tune_the_bakery_and_chat_with_the_result(page, live, http):
    """Upload the bakery's data, start a job with the settings of test_platform_bakery.py (plus
    the eval file), watch the chart grow, and ask the result a question it learned."""
    open_console(page, live, "data")
    for name in ("train.jsonl", "eval.jsonl"):
        page.set_input_files("#upload-file", str(BAKERY / name))
        page.wait_for_selector("#validation.ok", timeout=60_000)
        page.click("#upload-send")
        page.wait_for_function(f"() => document.querySelector('#validation-summary').textContent.startsWith('{name} is stored')")
    page.click("#tab-finetune")
    files = {f["filename"]: f["id"] for f in http.get("/v1/files").json()["data"]}
    page.wait_for_function(f"() => document.querySelector('#ft-training option[value=\"{files['train.jsonl']}\"]') !== null")
    page.select_option("#ft-training", files["train.jsonl"])
    page.select_option("#ft-validation", files["eval.jsonl"])
    for field, value in (("epochs", "5"), ("lr", "20"), ("batch", "1"), ("rank", "32"), ("seq-len", "512"),
                         ("suffix", "bakery")):
        page.fill(f"#ft-{field}", value)
    page.click("#ft-create")
    page.wait_for_selector("#job:not([hidden])")
    points = []
    deadline = time.monotonic() + 1200
    while page.locator("#job-status").inner_text() not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the job did not finish in 20 minutes"
        points.append(int(page.locator("#job-chart").get_attribute("data-points") or 0))
        time.sleep(1)
    assert page.locator("#job-status").inner_text() == "succeeded", text_of(page, "#job-error")
    final = int(page.locator("#job-chart").get_attribute("data-points"))
    assert len({p for p in points if 0 < p < final}) >= 2, points  # the chart grew while the job ran
    assert int(page.locator("#job-chart").get_attribute("data-valid-points")) >= 1
    assert page.locator("#job-chart polyline.train").count() == 1
    shoot(page, "finetune")

    model = page.locator("#job-title").inner_text()
    assert model.startswith("ft:galerne-mini:bakery:")
    page.click("#job-chat")
    page.wait_for_selector("#panel-chat", state="visible")
    assert page.input_value("#chat-model") == model
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "48")
    page.fill("#chat-input", "How much is a seeded loaf?")
    page.keyboard.press("Enter")
    page.wait_for_selector("#chat-log .msg.assistant.done")
    answer = page.locator("#chat-log .msg.assistant")
    assert answer.locator(".who").inner_text() == model
    assert "3.80" in answer.locator(".text").inner_text(), answer.locator(".text").inner_text()
    shoot(page, "chat")

    # the base and the result, side by side
    page.click("#tab-compare")
    base_answer, tuned_answer = compare(page, BASE, model, "How much is a seeded loaf?", 48)
    assert "3.80" in tuned_answer and base_answer != tuned_answer
    shoot(page, "compare")


# ------------------------------------------------------------------ images (vision models)


@pytest.fixture(scope="module")
def vision_live(vision_factory):
    folder, _ = vision_factory("mistral3")
    llm = LLM(folder, device="cpu", dtype="float32")
    app = create_app(llm, ServerSettings(api_key=[KEY], served_model_name=[VISION]))
    with LiveServer(app) as server:
        yield server


VISION = "tiny-vision"


def test_images_attach_to_a_message_for_a_vision_model(browser, vision_live, live, tmp_path):
    """The Image button shows for a model whose card says it sees images (not for
    galerne-mini); attached images go with the message as image parts, and the answer
    is the API's own for the same message."""
    from PIL import Image

    from test_vision import data_uri, picture

    context = browser.new_context(viewport={"width": 1280, "height": 820})
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        open_console(page, live)
        assert not page.is_visible("#chat-attach")  # galerne-mini sees no images
        open_console(page, vision_live)
        page.locator("#chat-attach").wait_for(state="visible")
        image = tmp_path / "red <b>square<i>.png"
        picture(40, 24, 0).save(image)
        page.set_input_files("#chat-image", str(image))
        page.locator("#chat-attachments .chip").wait_for(state="visible")
        assert "red <b>square<i>.png" in text_of(page, "#chat-attachments")  # as text
        page.fill("#chat-temperature", "0")
        page.fill("#chat-max-tokens", "6")
        page.fill("#chat-input", "What is this?")
        page.keyboard.press("Enter")
        page.wait_for_function("() => !document.querySelector('#chat-send').disabled "
                               "&& document.querySelectorAll('#chat-log .msg.assistant').length === 1")
        page.wait_for_function("() => document.querySelector('#chat-log .msg.assistant .text').textContent.length > 0")
        page.set_input_files("#chat-image", str(image))  # the next message's, for the screenshot
        shoot(page, "chat-image")
        page.click("#chat-attachments .chip button")  # removed again
        assert page.locator("#chat-attachments").is_hidden()
        shown = text_of(page, "#chat-log .msg.assistant .text")
        assert "image: red <b>square<i>.png" in text_of(page, "#chat-log .msg.user")
        r = httpx.post(vision_live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
            "model": VISION, "temperature": 0, "max_tokens": 6, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_uri(Image.open(image))}}]}]})
        assert r.status_code == 200 and shown.strip() == r.json()["choices"][0]["message"]["content"].strip()
        assert errors == []
    finally:
        context.close()
