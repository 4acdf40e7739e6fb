"""Fuzzing the request schemas: schemathesis generates requests from the app's own
OpenAPI spec, valid and not, and sends them in-process. No input may get a 5xx.

The app serves a tiny model with a short context, so that whatever n and
max_tokens a request asks for, generation stays small and the run fast.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.python import asgi as schemathesis_asgi

from galerne import LLM
from galerne.config import ServerSettings
from galerne.server import create_app

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def api_schema(tiny_factory, tmp_path_factory):
    folder, _ = tiny_factory("mistral")
    llm = LLM(folder, device="cpu", kv_cache_gb=0.02, max_model_len=48, block_size=8)
    lora_dir = tmp_path_factory.mktemp("lora_dir")  # run-time loads on, from an empty folder
    app = create_app(llm, ServerSettings(api_key=[KEY], served_model_name=["tiny"], lora_dir=[str(lora_dir)],
                                         data_dir=str(tmp_path_factory.mktemp("fuzz-data"))))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    schemathesis_asgi.shutdown_lifespans()  # stops the AsyncEngine schemathesis started


# Every operation of the spec (test_every_operation_is_fuzzed keeps this list honest).
OPERATIONS = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/fim/completions"),
    ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("GET", "/health"), ("GET", "/metrics"),
    ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("GET", "/v1/lora_adapters"),
    ("DELETE", "/v1/models/{model_id}"),
    ("POST", "/v1/files"), ("POST", "/v1/files/validate"), ("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"),
    ("DELETE", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"), ("GET", "/v1/files/{file_id}/url"),
    ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs/{job_id}"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"), ("POST", "/v1/fine_tuning/jobs/{job_id}/start"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/pause"), ("POST", "/v1/fine_tuning/jobs/{job_id}/resume"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"), ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    ("PATCH", "/v1/fine_tuning/models/{model_id}"), ("POST", "/v1/fine_tuning/models/{model_id}/archive"),
    ("DELETE", "/v1/fine_tuning/models/{model_id}/archive"),
    ("POST", "/v1/batches"), ("GET", "/v1/batches"), ("GET", "/v1/batches/{batch_id}"),
    ("POST", "/v1/batches/{batch_id}/cancel"), ("POST", "/v1/batch/jobs"), ("GET", "/v1/batch/jobs"),
    ("GET", "/v1/batch/jobs/{job_id}"), ("POST", "/v1/batch/jobs/{job_id}/cancel"), ("DELETE", "/v1/batch/jobs/{job_id}"),
]


def test_every_operation_is_fuzzed(api_schema):
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.slow  # hundreds of generated requests
@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_input_gets_a_server_error(api_schema, method, path):
    operation = api_schema[path][method]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]

    @given(case=st.one_of(*[operation.as_strategy(generation_mode=m) for m in modes]))
    @settings(max_examples=100 if method == "POST" else 10, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if isinstance(case.body, dict) and "model" in case.body and case.body["model"] != "tiny":
            case.body["model"] = "tiny"  # else most valid requests stop at the model check
        response = case.call(headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{case.body!r}"

    check()
