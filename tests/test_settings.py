"""Settings from flags, GALERNE_* variables and defaults (one mechanism for the server,
engine, model and sampling flags and the fine-tuning config), and the one source of
sampling defaults behind LLM, both API dialects and the CLI."""

from __future__ import annotations

import io
import os

import httpx
import pytest
from test_server import USER, LiveServer

from galerne import LLM, SamplingParams
from galerne.cli import build_parser, main
from galerne.config import (
    CLI_MAX_TOKENS,
    EngineSettings,
    ModelSettings,
    SamplingSettings,
    ServerSettings,
    from_args,
)
from galerne.engine.engine import Engine
from galerne.errors import ConfigError
from galerne.finetune.config import load_config, overrides_from_args
from galerne.server import create_app

COMMAND = {ServerSettings: "serve", ModelSettings: "generate", EngineSettings: "generate", SamplingSettings: "generate"}


@pytest.fixture(autouse=True)
def no_galerne_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("GALERNE_"):
            monkeypatch.delenv(name)


# ------------------------------------------------------------------ precedence


@pytest.mark.parametrize("cls, name, env, from_env, flags, from_flags", [
    (ServerSettings, "port", "9000", 9000, ["--port", "9001"], 9001),
    (ServerSettings, "drain_timeout", "2.5", 2.5, ["--drain-timeout", "1e1"], 10.0),
    (ServerSettings, "host", "0.0.0.0", "0.0.0.0", ["--host", "::1"], "::1"),
    (ModelSettings, "max_model_len", "4096", 4096, ["--max-model-len", "none"], None),
    (EngineSettings, "kv_cache_gb", "0.5", 0.5, ["--kv-cache-gb", "1"], 1.0),
    (EngineSettings, "enable_prefix_caching", "false", False, ["--prefix-caching"], True),
    (EngineSettings, "enable_prefix_caching", "off", False, ["--prefix-caching", "yes"], True),
    (EngineSettings, "enforce_eager", "1", True, ["--no-enforce-eager"], False),
    (EngineSettings, "enforce_eager", "on", True, ["--enforce-eager=false"], False),
    (ServerSettings, "api_key", " a, b ,", ["a", "b"], ["--api-key", "c", "--api-key", "d,e"], ["c", "d", "e"]),
    (ServerSettings, "served_model_name", "m,alias", ["m", "alias"], ["--served-model-name", "x"], ["x"]),
    (SamplingSettings, "stop", "a,b", ("a,b",), ["--stop", "x", "--stop", "y"], ("x", "y")),
    (SamplingSettings, "seed", "7", 7, ["--seed", "-3"], -3),
    (SamplingSettings, "max_tokens", "none", None, ["--max-tokens", "12"], 12),
    (SamplingSettings, "temperature", "0", 0.0, ["--temperature", "1.5"], 1.5),
    (ModelSettings, "layout", "hf", "hf", ["--layout", "mistral"], "mistral"),
])
def test_flag_beats_env_beats_default(monkeypatch, cls, name, env, from_env, flags, from_flags):
    def resolve(*argv: str):
        return getattr(from_args(cls, build_parser().parse_args([COMMAND[cls], *argv])), name)

    default = getattr(cls(), name)
    assert from_env != default and from_flags != from_env  # each layer shows
    assert resolve() == default
    monkeypatch.setenv("GALERNE_" + name.upper(), env)
    assert resolve() == from_env
    value = resolve(*flags)
    assert value == from_flags and type(value) is type(from_flags)  # "9001" became an int, "1" a float, ...


def test_bool_flag_before_the_model_argument():
    # A boolean flag takes the next word only when it is a boolean: MODEL stays the positional.
    ns = build_parser().parse_args(["serve", "--no-prefix-caching", "./model"])
    assert ns.model == "./model" and from_args(EngineSettings, ns).enable_prefix_caching is False
    ns = build_parser().parse_args(["serve", "./model", "--allow-no-auth"])
    assert ns.model == "./model" and from_args(ServerSettings, ns).allow_no_auth is True
    ns = build_parser().parse_args(["serve", "--enforce-eager", "./model", "--allow-no-auth", "no"])
    assert ns.model == "./model" and from_args(EngineSettings, ns).enforce_eager is True
    assert from_args(ServerSettings, ns).allow_no_auth is False
    ns = build_parser().parse_args(["finetune", "--skip-bad-lines", "c.yaml", "--lora.enable", "off"])
    assert ns.config == "c.yaml" and load_config(None, overrides_from_args(ns)).skip_bad_lines is True
    assert load_config(None, overrides_from_args(ns)).lora.enable is False


def test_help_shows_defaults_from_the_one_source():
    def help_of(command):
        return " ".join(build_parser()._subparsers._group_actions[0].choices[command].format_help().split())

    text = help_of("generate")
    assert "(default: 0.7) [env GALERNE_TEMPERATURE]" in text
    assert f"(default: {CLI_MAX_TOKENS}) [env GALERNE_MAX_TOKENS]" in text
    assert "(default: 1.0) [env GALERNE_TOP_P]" in text
    assert "(default: true; --no-prefix-caching: false) [env GALERNE_ENABLE_PREFIX_CACHING]" in text
    assert "--lora-rank" in help_of("finetune") and "GALERNE_" not in help_of("finetune")


# ------------------------------------------------------------------ bad values: one line, no traceback


@pytest.mark.parametrize("env, argv, message", [
    ({"GALERNE_PORT": "abc"}, ["serve", "/nonexistent"], "environment variable GALERNE_PORT: port: must be an integer, got 'abc'"),
    ({"GALERNE_PORT": "70000"}, ["serve", "/nonexistent"], "environment variable GALERNE_PORT: port: must be in 0..65535"),
    ({}, ["serve", "/nonexistent", "--port", "80.5"], "command line: port: must be an integer, got '80.5'"),
    ({"GALERNE_API_KEY": "k"}, ["serve", "/nonexistent", "--max-queued-requests", "0"],
     "command line: max_queued_requests: must be at least 1"),
    ({"GALERNE_ENFORCE_EAGER": "maybe"}, ["generate", "/nonexistent", "--prompt", "x"],
     "environment variable GALERNE_ENFORCE_EAGER: enforce_eager: must be true or false, got 'maybe'"),
    ({"GALERNE_LAYOUT": "gguf"}, ["generate", "/nonexistent", "--prompt", "x"],
     "environment variable GALERNE_LAYOUT: layout: must be one of mistral, hf, got 'gguf'"),
    ({"GALERNE_TOP_P": "2"}, ["generate", "/nonexistent", "--prompt", "x"],
     "environment variable GALERNE_TOP_P: top_p: must be <= 1.0"),
    ({}, ["generate", "/nonexistent", "--prompt", "x", "--max-tokens", "ten"],
     "command line: max_tokens: must be an integer, got 'ten'"),
    ({}, ["generate", "/nonexistent", "--prompt", "x", "--ignore-eos=maybe"],
     "command line: ignore_eos: must be true or false, got 'maybe'"),
    ({}, ["generate", "/nonexistent", "--prompt", "x", "--kv-cache-gb", "nan"],
     "command line: kv_cache_gb: must be a number, got 'nan'"),
    ({}, ["serve", "/nonexistent", "--max-running-jobs", "0"], "command line: max_running_jobs: must be at least 1"),
    ({"GALERNE_DATABASE_URL": "mysql://x"}, ["serve", "/nonexistent"],
     "environment variable GALERNE_DATABASE_URL: database_url: must start with sqlite:/// or postgresql://"),
    ({}, ["serve", "/nonexistent", "--max-upload-mb", "0"], "command line: max_upload_mb: must be > 0"),
    ({}, ["serve", "--data-dir", "/proc/galerne"], "data_dir: cannot use /proc/galerne: No such file or directory"),
    # Said before anything else (not after the notice of the built-in model).
    ({"GALERNE_ENFORCE_EAGER": "sometimes"}, ["serve"],
     "environment variable GALERNE_ENFORCE_EAGER: enforce_eager: must be true or false, got 'sometimes'"),
])
def test_bad_values_are_one_line_naming_key_and_source(monkeypatch, capsys, env, argv, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("galerne: error: " + message), err
    assert err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------ the fine-tuning config: YAML and flags alike


def _from_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


def _from_flags(*argv):
    ns = build_parser().parse_args(["finetune", "unused.yaml", *argv])
    return load_config(None, overrides_from_args(ns))


@pytest.mark.parametrize("yaml, flags, get, value", [
    ("lora:\n  rank: 8\n", ["--lora.rank", "8"], lambda c: c.lora.rank, 8),
    ("lora:\n  rank: 8\n", ["--lora-rank", "8"], lambda c: c.lora.rank, 8),
    ("optim:\n  lr: 1e-4\n", ["--optim.lr", "1e-4"], lambda c: c.optim.lr, 1e-4),
    ("lora:\n  enable: false\n", ["--lora.enable", "false"], lambda c: c.lora.enable, False),
    ("skip_bad_lines: true\n", ["--skip-bad-lines"], lambda c: c.skip_bad_lines, True),
    ("lora:\n  targets: [wq, wv]\n", ["--lora.targets", "wq,wv"], lambda c: c.lora.targets, ["wq", "wv"]),
    ("lora:\n  targets: wq, wv\n", ["--lora.targets", "wq", "--lora.targets", "wv"], lambda c: c.lora.targets, ["wq", "wv"]),
    ("run_dir: 2024\n", ["--run-dir", "2024"], lambda c: c.run_dir, "2024"),
])
def test_finetune_yaml_and_flags_give_the_same_value(tmp_path, yaml, flags, get, value):
    a, b = get(_from_yaml(tmp_path, yaml)), get(_from_flags(*flags))
    assert a == b == value and type(a) is type(b) is type(value)


@pytest.mark.parametrize("yaml, flags, message", [
    ("lora:\n  rank: four\n", ["--lora.rank", "four"], "lora.rank: must be an integer, got 'four'"),
    ("optim:\n  lr: fast\n", ["--optim.lr", "fast"], "optim.lr: must be a number, got 'fast'"),
    ("lora:\n  enable: maybe\n", ["--lora.enable=maybe"], "lora.enable: must be true or false, got 'maybe'"),
    ("seq_len: 0\n", ["--seq-len", "0"], "seq_len: must be at least 1, got 0"),
])
def test_finetune_yaml_and_flags_fail_alike_naming_their_source(tmp_path, yaml, flags, message):
    with pytest.raises(ConfigError) as from_file:
        _from_yaml(tmp_path, yaml)
    assert str(from_file.value) == f"{tmp_path / 'c.yaml'}: {message}"
    with pytest.raises(ConfigError) as from_flags:
        _from_flags(*flags)
    assert str(from_flags.value) == f"command line: {message}"


def test_finetune_reads_no_environment(monkeypatch):
    monkeypatch.setenv("GALERNE_MAX_STEPS", "5")
    assert _from_flags().max_steps == 100 and _from_flags("--max-steps", "7").max_steps == 7


# ------------------------------------------------------------------ one source of sampling defaults


@pytest.fixture
def engine_params(monkeypatch):
    """The SamplingParams of every request that reaches an engine."""
    seen: list[SamplingParams] = []
    add = Engine.add_request

    def recording(self, request):
        seen.append(request.params)
        return add(self, request)

    monkeypatch.setattr(Engine, "add_request", recording)
    return seen


@pytest.fixture(scope="module")
def folder(tiny_factory):
    return tiny_factory("mistral")[0]


@pytest.fixture(scope="module")
def live(folder):
    llm = LLM(folder, device="cpu", kv_cache_gb=0.02)
    with LiveServer(create_app(llm, ServerSettings(served_model_name=["m"]))) as server:
        yield server


def test_llm_uses_the_neutral_defaults(folder, engine_params):
    LLM(folder, device="cpu", max_model_len=16).generate("Once upon a time")
    assert engine_params == [SamplingParams()]
    assert SamplingParams().temperature == 1.0 and SamplingParams().max_tokens is None


def test_the_dialects_defaults_reach_the_engine(live, engine_params):
    mistral = {"X-Galerne-Dialect": "mistral"}
    with httpx.Client(base_url=live.url, timeout=60) as client:
        chat = {"model": "m", "messages": USER, "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post("/v1/completions", json={"model": "m", "prompt": "Hi"}).status_code == 200
        assert client.post("/v1/chat/completions", json=chat, headers=mistral).status_code == 200
        assert client.post("/v1/fim/completions", json={"model": "m", "prompt": "def f(", "max_tokens": 2}).status_code == 200
        # top_p 0 means greedy; other fields a request gives pass as given
        given = {**chat, "top_p": 0, "stop": "x", "n": 2, "random_seed": 3}
        assert client.post("/v1/chat/completions", json=given, headers=mistral).status_code == 200
        card = client.get("/v1/models/m").json()
    assert engine_params == [
        SamplingParams(max_tokens=2),  # OpenAI: SamplingParams' defaults (temperature 1.0)
        SamplingParams(max_tokens=16),  # OpenAI's legacy completions: its own documented 16 tokens
        SamplingParams(max_tokens=2, temperature=0.7),  # Mistral: the temperature La Plateforme applies
        SamplingParams(max_tokens=2, temperature=0.7),
        SamplingParams(max_tokens=2, temperature=0.0, stop=("x",), n=2, seed=3),
    ]
    assert card["default_model_temperature"] == 0.7


def test_cli_defaults_reach_the_engine(folder, engine_params, monkeypatch, capsys):
    assert main(["generate", str(folder), "--prompt", "Once upon a time", "--device", "cpu"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", str(folder), "--device", "cpu", "--top-k", "5"]) == 0
    assert engine_params == [SamplingParams(temperature=0.7, max_tokens=CLI_MAX_TOKENS),
                             SamplingParams(temperature=0.7, max_tokens=CLI_MAX_TOKENS, top_k=5)]
