"""Images through the API: the real ``openai`` and ``mistralai`` clients send base64
images to a live server on a tiny vision model; bad images and URLs get a 400 that names
the part and the problem; URLs are fetched only with --allow-image-urls, under a size and
time limit."""

from __future__ import annotations

import base64
import json
import http.server
import io
import threading
import time

import httpx
import openai
import pytest
from mistralai.client import Mistral
from PIL import Image
from test_server import KEY, LiveServer
from test_vision import data_uri, picture, user

from galerne import LLM, SamplingParams
from galerne.config import ServerSettings
from galerne.server import create_app

MODEL = "tiny-vision"


@pytest.fixture(scope="module")
def folder(vision_factory):
    return vision_factory("mistral3")[0]


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server: /ok.png (an image), /big.png (over the limit), /slow.png
    (drips a byte every 0.2 s)."""
    png = io.BytesIO()
    picture(24, 16, 5).save(png, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/slow.png":
                self.send_response(200)
                self.end_headers()
                for b in png.getvalue()[:40]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            body = png.getvalue() if self.path == "/ok.png" else b"\0" * (3 << 20)
            self.send_response(200 if self.path in ("/ok.png", "/big.png") else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def live(folder):
    llm = LLM(folder, device="cpu", dtype="float32", quantized_activations="float")
    settings = ServerSettings(api_key=[KEY], served_model_name=[MODEL], max_body_mb=8.0, max_image_mb=1.0)
    with LiveServer(create_app(llm, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def expected(folder):
    """What LLM.chat answers for the test prompt, in process."""
    llm = LLM(folder, device="cpu", dtype="float32", quantized_activations="float")
    messages = user("What is this?", picture(40, 24, 0))
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8))[0]
    return out.text, len(llm.tokenizer.encode_chat_with_images(messages)[0])


def test_openai_client_sends_a_base64_image(live, expected):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": data_uri(picture(40, 24, 0)), "detail": "high"}}]}])
    assert (r.choices[0].message.content, r.usage.prompt_tokens) == expected
    card = client.models.retrieve(MODEL)
    assert card.model_extra["capabilities"]["vision"] is True


def test_mistralai_client_sends_a_base64_image(live, expected):
    client = Mistral(api_key=KEY, server_url=live.url)
    r = client.chat.complete(model=MODEL, temperature=0, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": data_uri(picture(40, 24, 0))}]}])
    assert (r.choices[0].message.content, r.usage.prompt_tokens) == expected
    # Streaming, several images in one message.
    stream = client.chat.stream(model=MODEL, temperature=0, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": data_uri(picture(16, 16, 1))}, {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": data_uri(picture(30, 10, 2))}}]}])
    text = "".join(e.data.choices[0].delta.content or "" for e in stream)
    assert text


def _post(live, content, **extra) -> httpx.Response:
    return httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": MODEL, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": content}], **extra})


def _image(url) -> list[dict]:
    return [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]


def test_bad_images_get_a_400_naming_the_problem(live):
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")
    tiff = io.BytesIO()
    picture(8, 8, 0).save(tiff, format="TIFF")
    whole = base64.b64decode(data_uri(picture(64, 64, 3)).split(",", 1)[1])
    cases = {
        "data:image/png;base64,@@@": "not valid base64",
        "data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode(): "9000x9000 pixels is over the limits",
        "data:image/tiff;base64," + base64.b64encode(tiff.getvalue()).decode(): "supported format",
        "data:image/png;base64," + base64.b64encode(whole[:300]).decode(): "truncated or corrupt",
        "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\0" * (1 << 20)).decode(): "over the limit of 1048576 bytes",
        "data:application/pdf;base64,JVBERi0=": "not an image",
        "http://169.254.169.254/latest/meta-data/iam": "--allow-image-urls",
        "file:///etc/passwd": "unsupported image URL scheme 'file'",
        "": "non-empty string",
    }
    for url, message in cases.items():
        r = _post(live, _image(url))
        assert r.status_code == 400, (url[:40], r.text)
        error = r.json()["error"]
        assert message in error["message"] and "messages[0].content[1].image_url" in error["message"], error
    # The wrong shapes of a part, and an image where only a user message may hold one.
    r = _post(live, [{"type": "image_url", "image_url": 42}])
    assert r.status_code == 400 and "messages[0].content" in r.text
    r = httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": MODEL, "messages": [{"role": "system", "content": _image(data_uri(picture(8, 8, 0)))},
                                     {"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "only user messages" in r.text
    r = _post(live, [{"type": "image_url", "image_url": data_uri(picture(8, 8, k))} for k in range(17)])
    assert r.status_code == 400 and "17 images is over the limit of 16" in r.text
    # The server still answers.
    assert _post(live, _image(data_uri(picture(8, 8, 0)))).status_code == 200


def test_image_urls_only_with_the_flag_and_under_limits(folder, image_host):
    llm = LLM(folder, device="cpu", dtype="float32", quantized_activations="float")
    settings = ServerSettings(api_key=[KEY], served_model_name=[MODEL], allow_image_urls=True, max_image_mb=1.0,
                              image_url_timeout=1.0)
    with LiveServer(create_app(llm, settings)) as live:
        ok = _post(live, _image(image_host + "/ok.png"))
        assert ok.status_code == 200, ok.text
        inline = _post(live, _image(data_uri(picture(24, 16, 5))))
        assert ok.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
        for path, message in (("/big.png", "over the limit"), ("/slow.png", "took over 1 s"),
                              ("/missing.png", "HTTP 404")):
            started = time.monotonic()
            r = _post(live, _image(image_host + path))
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
            assert time.monotonic() - started < 5


def test_langchain_clients_send_images(live, expected):
    """LangChain's image messages: ChatOpenAI sends OpenAI's parts, ChatMistralAI
    Mistral's; both get the answer LLM.chat gives."""
    from langchain_core.messages import HumanMessage
    from langchain_mistralai import ChatMistralAI
    from langchain_openai import ChatOpenAI

    message = HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                    {"type": "image_url", "image_url": {"url": data_uri(picture(40, 24, 0))}}])
    oai = ChatOpenAI(model=MODEL, api_key=KEY, base_url=live.url + "/v1", max_tokens=8, temperature=0, max_retries=0)
    assert oai.invoke([message]).content == expected[0]
    mistral = ChatMistralAI(model=MODEL, api_key=KEY, endpoint=live.url + "/v1", max_tokens=8, temperature=0,
                            max_retries=0)
    assert mistral.invoke([message]).content == expected[0]


def test_a_fine_tuning_file_with_images_is_checked_line_by_line(live):
    """The platform's file check reads image lines as training does: a good one passes,
    a bad image is its line's problem, nothing is stored by the check."""
    good = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Colour?"},
                                                       {"type": "image_url", "image_url": data_uri(picture(16, 16, 0))}]},
                         {"role": "assistant", "content": "Red."}]}
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,@@"}]},
                        {"role": "assistant", "content": "?"}]}
    body = (json.dumps(good) + "\n" + json.dumps(bad) + "\n").encode()
    r = httpx.post(live.url + "/v1/files/validate", headers={"Authorization": f"Bearer {KEY}"},
                   files={"file": ("images.jsonl", body)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    v = r.json()
    assert [p["line"] for p in v["problems"]] == [2] and "not valid base64" in v["problems"][0]["reason"]


@pytest.mark.slow
def test_a_fine_tuning_job_on_images_serves_its_projector(folder, tmp_path):
    """The loop through the API: a JSONL with images uploaded, a LoRA job run by the
    server, its model then asked about an image: the answer is the merged adapter's
    (the trained projector is used), not the base's."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Colour?"},
                                                        {"type": "image_url", "image_url": data_uri(picture(32, 32, k))}]},
                          {"role": "assistant", "content": "Red."}]} for k in range(4)]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    llm = LLM(folder, device="cpu", dtype="float32", quantized_activations="float")
    app = create_app(llm, ServerSettings(served_model_name=[MODEL], data_dir=str(tmp_path / "data"), max_body_mb=8.0))
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
        upload = client.files.create(file=open(train_file, "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=MODEL, training_file=upload.id, suffix="img", seed=0,
            extra_body={"hyperparameters": {"training_steps": 6, "learning_rate_multiplier": 100, "batch_size": 1,
                                            "seq_len": 256, "lora_rank": 4}})
        deadline = time.monotonic() + 600
        while job.status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, "the job did not finish in 10 minutes"
            time.sleep(1)
            job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        question = rows[0]["messages"][:1]

        def answer(model: str):
            r = client.chat.completions.create(model=model, messages=question, max_tokens=4, temperature=0,
                                               logprobs=True)
            return [t.logprob for t in r.choices[0].logprobs.content]

        tuned, base = answer(job.fine_tuned_model), answer(MODEL)
        # The fine-tuned model the platform serves: its adapter, with the projector beside it.
        adapter = tmp_path / "data" / "models" / job.id
        assert (adapter / "projector.safetensors").is_file()
    merged = LLM(folder, device="cpu", dtype="float32", adapter=adapter, quantized_activations="float")
    want = merged.chat(question, SamplingParams(temperature=0, max_tokens=4, logprobs=1))[0].outputs[0].logprobs
    assert tuned == pytest.approx(want, abs=1e-3) and tuned != pytest.approx(base, abs=1e-3)
