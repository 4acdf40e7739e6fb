"""Adapters served unmerged through the HTTP server: loaded at startup (--lora) and at
run time (POST /v1/load_lora_adapter, inside --lora-dir only), picked by ``model``,
listed in /v1/models with their parent, unloaded and loaded again; every bad adapter,
name or path refused with a 4xx while the base keeps serving; a slow load stalls no
other client."""

from __future__ import annotations

import json
import os
import threading

import httpx
import openai
import pytest
from mistralai.client import Mistral
from safetensors.torch import load_file, save_file

from galerne import LLM, SamplingParams
from galerne.config import ServerSettings, from_args
from galerne.engine.adapters import AdapterManager
from galerne.errors import ConfigError, InvalidParameter, ModelLoadError
from galerne.server import create_app
from test_multi_lora import make_adapter
from test_server import KEY, MODEL, USER, LiveServer, wait_idle

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = list(range(10, 30))
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return tiny_factory("mistral")[0]


@pytest.fixture(scope="module")
def lora_dir(tiny, tmp_path_factory):
    """The allowed folder: adapters a (PEFT, rank 4) and b (Mistral layout, rank 8)."""
    root = tmp_path_factory.mktemp("lora_dir")
    make_adapter(tiny, root / "a", 4, ("wq", "wk", "wo", "w2"), "peft", seed=1)
    make_adapter(tiny, root / "b", 8, ("wv", "w1", "w3", "wq"), "mistral", seed=2)
    return root


@pytest.fixture(scope="module")
def merged(tiny, lora_dir):
    """The references: each adapter merged into the base, alone; None: the base."""
    return {None: LLM(tiny, device="cpu"), "a": LLM(tiny, device="cpu", adapter=lora_dir / "a"),
            "b": LLM(tiny, device="cpu", adapter=lora_dir / "b")}


@pytest.fixture(scope="module")
def live(tiny, lora_dir):
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.02, block_size=16, max_loras=2, max_lora_rank=8)
    settings = ServerSettings(api_key=[KEY], served_model_name=[MODEL, "alias"], lora=[f"b={lora_dir / 'b'}"],
                              lora_dir=[str(lora_dir)])
    with LiveServer(create_app(llm, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def load(live, name, path, **headers) -> httpx.Response:
    return httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                      headers=AUTH | headers, timeout=60)


def unload(live, name) -> httpx.Response:
    return httpx.post(live.url + "/v1/unload_lora_adapter", json={"lora_name": name}, headers=AUTH, timeout=60)


def complete(oai, model: str) -> str:
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert r.model == (MODEL if model == "alias" else model)  # an alias answers as the base's id
    return r.choices[0].text


def adapter_names(live) -> list[str]:
    return [a["name"] for a in httpx.get(live.url + "/v1/lora_adapters", headers=AUTH).json()["data"]]


# ------------------------------------------------------------------ load, serve, unload, reload


def test_load_serve_unload_reload(live, oai, merged, lora_dir):
    # b came with --lora at startup; a comes now, by a path relative to --lora-dir.
    assert adapter_names(live) == ["b"]
    r = load(live, "a", "a")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' added successfully."
    models = {m.id: m for m in oai.models.list().data}
    assert list(models) == [MODEL, "b", "a"]
    assert models["a"].parent == MODEL and models["a"].type == "fine-tuned" and models["a"].root == MODEL
    assert oai.models.retrieve("a").id == "a"
    listed = httpx.get(live.url + "/v1/lora_adapters", headers=AUTH).json()["data"]
    assert [(x["name"], x["rank"], x["layout"], x["parent"]) for x in listed] == \
        [("b", 8, "mistral", MODEL), ("a", 4, "peft", MODEL)]
    assert set(listed[1]["targets"]) == {"wq", "wk", "wo", "w2"}

    # Each model answers as the base with that adapter merged, alone (greedy tokens).
    want = {name: merged[name].generate([PROMPT], GREEDY)[0].text for name in merged}
    assert len(set(want.values())) == 3  # the adapters change the answer
    assert complete(oai, "a") == want["a"] and complete(oai, "b") == want["b"]
    assert complete(oai, MODEL) == want[None] and complete(oai, "alias") == want[None]
    chat = oai.chat.completions.create(model="a", messages=USER, max_tokens=8, temperature=0)
    assert chat.model == "a"
    ref = merged["a"].chat(USER, SamplingParams(max_tokens=8, temperature=0))[0]
    assert chat.choices[0].message.content == ref.text

    # The mistralai client reads the adapter's card as a fine-tuned model, and chats through it.
    mis = Mistral(api_key=KEY, server_url=live.url)
    cards = {c.id: c for c in mis.models.list().data}
    assert cards["a"].type == "fine-tuned" and cards["a"].root == MODEL and cards[MODEL].type == "base"
    assert mis.chat.complete(model="a", messages=USER, max_tokens=8, temperature=0).model == "a"

    # Unloading while a stream runs through it: the stream ends normally; new requests are refused.
    stream = oai.chat.completions.create(model="a", messages=USER, max_tokens=24, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    chunks = [next(stream)]
    r = unload(live, "a")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' removed successfully."
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="a", messages=USER, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["message"].endswith("alias, b")
    assert [m.id for m in oai.models.list().data] == [MODEL, "b"]
    r = unload(live, "a")
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"

    # Loaded again (absolute path): the same answers as before.
    assert load(live, "a", lora_dir / "a").status_code == 200
    assert complete(oai, "a") == want["a"]
    assert unload(live, "a").status_code == 200
    wait_idle(live.state)
    assert live.state.llm.engine.adapters.stats()["adapters_loaded"] == 1


def test_fim_and_echo_through_an_adapter(live, oai, merged):
    """FIM (Mistral's route) and the echoed prompt's logprobs (scoring) go through the
    adapter too: the prompt's logprobs are those of the adapter merged."""
    mis = Mistral(api_key=KEY, server_url=live.url)
    fim = mis.fim.complete(model="b", prompt="def add(a, b):\n    return ", suffix="\n", max_tokens=4, temperature=0)
    assert fim.model == "b"
    r = oai.completions.create(model="b", prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=0)
    got = r.choices[0].logprobs.token_logprobs[1:len(PROMPT)]
    for name, close in (("b", True), (None, False)):
        ref = merged[name].generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
        want = [e.logprob for e in ref.prompt_logprobs[1:]]
        assert (max(abs(x - y) for x, y in zip(got, want)) < 1e-4) is close, name


def test_a_slow_load_stalls_no_other_client(live, oai, lora_dir, monkeypatch):
    """The files are read in a worker thread: while a read hangs, streams run to their end
    and other routes answer."""
    entered, release = threading.Event(), threading.Event()
    read = AdapterManager.read

    def slow_read(self, path):
        entered.set()
        assert release.wait(60)
        return read(self, path)

    monkeypatch.setattr(AdapterManager, "read", slow_read)
    answer = {}
    loader = threading.Thread(target=lambda: answer.setdefault("r", load(live, "slow", "a")))
    loader.start()
    try:
        assert entered.wait(30)
        for model in (MODEL, "b"):
            chunks = list(oai.chat.completions.create(model=model, messages=USER, max_tokens=16, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True}))
            assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
            assert chunks[-1].choices[0].finish_reason == "length"
        assert httpx.get(live.url + "/health").status_code == 200
        assert "slow" not in adapter_names(live)
        # Its name is taken while it loads.
        r = load(live, "slow", "b")
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_exists"
    finally:
        release.set()
        loader.join(60)
    assert answer["r"].status_code == 200
    assert complete(oai, "slow")
    assert unload(live, "slow").status_code == 200


# ------------------------------------------------------------------ refusals


@pytest.fixture(scope="module")
def hostile(lora_dir, tmp_path_factory, tiny):
    """Paths each refused for its own reason, inside and outside the allowed folder."""
    outside = tmp_path_factory.mktemp("outside")
    make_adapter(tiny, outside / "good", 4, ("wq",), "peft", seed=3)
    (lora_dir / "escape").symlink_to(outside / "good")  # a link to a good adapter, outside
    (lora_dir / "sneaky").mkdir()  # a folder inside whose weights link outside
    (lora_dir / "sneaky" / "adapter_config.json").write_text((outside / "good" / "adapter_config.json").read_text())
    (lora_dir / "sneaky" / "adapter_model.safetensors").symlink_to(outside / "good" / "adapter_model.safetensors")
    (lora_dir / "empty").mkdir()
    (lora_dir / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (lora_dir / "loop").symlink_to(lora_dir / "loop")
    os.mkfifo(lora_dir / "fifo")
    # An adapter for another base: a's tensors with one more input feature.
    other = lora_dir / "other"
    other.mkdir()
    tensors = load_file(lora_dir / "a" / "adapter_model.safetensors")
    name = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[name] = tensors[name].new_zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, other / "adapter_model.safetensors")
    (other / "adapter_config.json").write_text((lora_dir / "a" / "adapter_config.json").read_text())
    # A bad config: r is not a number.
    bad_cfg = lora_dir / "bad_cfg"
    bad_cfg.mkdir()
    (bad_cfg / "adapter_model.safetensors").write_bytes((lora_dir / "a" / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((lora_dir / "a" / "adapter_config.json").read_text()) | {"r": "four"}
    (bad_cfg / "adapter_config.json").write_text(json.dumps(cfg))
    # A weights file far larger than any adapter of this base (sparse: no disk used, never read).
    (lora_dir / "huge").mkdir()
    with open(lora_dir / "huge" / "lora.safetensors", "wb") as f:
        f.truncate(64 << 30)
    return outside


PATH_CASES = [  # lora_path (relative to --lora-dir unless absolute), status, error code
    ("nope", 404, "adapter_not_found"),
    ("/etc", 403, "adapter_path_not_allowed"),
    ("/etc/passwd", 403, "adapter_path_not_allowed"),
    ("/nonexistent/x", 403, "adapter_path_not_allowed"),  # outside: refused, not said to be missing
    ("../outside/good", 403, "adapter_path_not_allowed"),
    ("a/../../x", 403, "adapter_path_not_allowed"),
    ("escape", 403, "adapter_path_not_allowed"),
    ("sneaky", 403, "adapter_path_not_allowed"),
    ("empty", 400, "invalid_adapter"),
    ("junk.safetensors", 400, "invalid_adapter"),
    ("loop", 400, "invalid_adapter"),
    ("fifo", 400, "invalid_adapter"),
    ("other", 400, "invalid_adapter"),
    ("bad_cfg", 400, "invalid_adapter"),
    ("huge", 400, "adapter_too_large"),
    ("a/adapter_config.json", 400, "invalid_adapter"),  # a file, but not safetensors
    ("", 400, "invalid_value"),
    ("x" * 5000, 400, "invalid_value"),
    ("a\x00b", 400, "invalid_value"),
    ("a\nb", 400, "invalid_value"),
]


@pytest.mark.parametrize("path, status, code", PATH_CASES, ids=[repr(c[0])[:30] for c in PATH_CASES])
def test_bad_paths_are_refused_and_the_base_serves(live, oai, hostile, path, status, code):
    if path.startswith("../outside"):
        path = os.path.relpath(hostile / "good", live.state.lora_dirs[0])
    r = load(live, "x", path)
    body = r.json()["error"]
    assert (r.status_code, body["code"], body["param"]) == (status, code, "lora_path"), body
    assert body["message"]
    assert adapter_names(live) == ["b"]
    assert complete(oai, MODEL) and complete(oai, "b")


NAME_CASES = ["", "x" * 65, "é", "a b", "a/b", "../a", "a\n", "\x00", "-a", MODEL, "alias"]


@pytest.mark.parametrize("name", NAME_CASES, ids=[repr(n)[:20] for n in NAME_CASES])
def test_bad_names_are_refused(live, name):
    r = load(live, name, "a")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    assert adapter_names(live) == ["b"]


@pytest.mark.parametrize("route, body", [
    ("load", {"lora_name": 5, "lora_path": "a"}), ("load", {"lora_name": "x", "lora_path": ["a"]}),
    ("load", {"lora_name": "x"}), ("load", {"lora_path": "a"}), ("load", {"lora_name": None, "lora_path": "a"}),
    ("load", ["x", "a"]), ("load", "x"), ("unload", {"lora_name": 5}), ("unload", {}), ("unload", {"lora_name": [1]}),
    ("unload", None),
])
def test_wrong_json_types_are_400(live, route, body):
    r = httpx.post(live.url + f"/v1/{route}_lora_adapter", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text
    r = httpx.post(live.url + f"/v1/{route}_lora_adapter", content=b'{"lora_name": "x",', headers=AUTH)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_a_loaded_name_errors_in_each_dialect_and_auth(live):
    r = load(live, "b", "a")
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_exists"
    r = load(live, "nope", "nope", **{"X-Galerne-Dialect": "mistral"})
    assert r.status_code == 404 and r.json()["object"] == "error" and r.json()["param"] == "lora_path"
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "a"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "b"})):
        assert httpx.post(live.url + path, json=body).status_code == 401
    assert httpx.get(live.url + "/v1/lora_adapters").status_code == 401
    assert adapter_names(live) == ["b"]


def test_run_time_loading_is_off_without_lora_dir(tiny, lora_dir):
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.01, block_size=16)
    with LiveServer(create_app(llm, ServerSettings(served_model_name=[MODEL]))) as server:
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(lora_dir / "a")})
        body = r.json()["error"]
        assert r.status_code == 403 and body["code"] == "runtime_loading_disabled" and "--lora-dir" in body["message"]
        assert httpx.get(server.url + "/v1/lora_adapters").json()["data"] == []


# ------------------------------------------------------------------ startup


def test_serve_flags(tmp_path):
    from galerne.cli import build_parser

    ns = build_parser().parse_args(["serve", "m", "--lora", f"a={tmp_path}", "--lora", "ft:base:x:1=/p=q",
                                    "--lora-dir", str(tmp_path), "--lora-dir", str(tmp_path)])
    settings = from_args(ServerSettings, ns, env=False)
    assert settings.lora_adapters == {"a": str(tmp_path), "ft:base:x:1": "/p=q"}
    assert settings.lora_dir == [str(tmp_path)] * 2
    for bad in (["--lora", "a"], ["--lora", "a="], ["--lora", "a b=/p"], ["--lora", "a=/p", "--lora", "a=/q"],
                ["--lora-dir", str(tmp_path / "missing")]):
        with pytest.raises(ConfigError):
            from_args(ServerSettings, build_parser().parse_args(["serve", "m", *bad]), env=False)


def test_startup_adapters(tiny, lora_dir, tmp_path):
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.01, block_size=16)
    app = create_app(llm, ServerSettings(served_model_name=[MODEL], lora=[f"a={lora_dir / 'a'}"]))
    assert [a.name for a in app.state.server.adapters()] == ["a"]
    with pytest.raises(InvalidParameter, match="base model's id"):
        create_app(llm, ServerSettings(served_model_name=[MODEL], lora=[f"{MODEL}={lora_dir / 'b'}"]))
    with pytest.raises(ModelLoadError):
        create_app(llm, ServerSettings(served_model_name=[MODEL], lora=[f"c={tmp_path}"]))
    assert [a.name for a in llm.adapters()] == ["a"]
