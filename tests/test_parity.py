"""Our logits and greedy tokens equal transformers' for the same weights."""

from __future__ import annotations

import pytest
import torch

from galerne import LLM, SamplingParams
from galerne.weights.export import convert

from conftest import write_native

# Ministral 3's prompts and generations reach past its YaRN original context (16) and
# several llama-4 scaling steps; Ministral's past its 8-token window on layer 0.
NEW = ["ministral3", "ministral3-mscale", "ministral", "mistral3", "mistral3-ministral3"]
KINDS = ["mistral", "mistral-window", "head-dim", "tied", "mixtral", "llama", "native",
         *NEW, *(f"native-{k}" for k in NEW)]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tiny_factory, tmp_path_factory):
    kind = request.param
    if kind == "native":  # a Mistral-native folder converted from the HF one
        folder, ref = tiny_factory("mistral-window")
        native = tmp_path_factory.mktemp("native") / "m"
        convert(folder, native, "mistral")
        assert (native / "params.json").exists() and (native / "consolidated.safetensors").exists()
        folder = native
    elif kind.startswith("native-"):  # params.json written by hand, Mistral's keys
        _, ref = tiny_factory(kind.removeprefix("native-"))
        folder = write_native(ref, tmp_path_factory.mktemp(kind) / "m")
    else:
        folder, ref = tiny_factory(kind)
    return kind, LLM(folder, dtype="float32", device="cpu"), ref


def test_score_matches_transformers(pair):
    kind, llm, ref = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32768, (48,), generator=g)  # longer than the 16-token window
    with torch.no_grad():
        expected = ref(ids[None]).logits[0].float()
    ours = llm.score(ids.tolist())
    assert ours.dtype == torch.float32 and ours.shape == (48, 32768)
    assert (ours - expected).abs().max().item() < 1e-4


def test_greedy_64_tokens_match_transformers(pair):
    kind, llm, ref = pair
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 32768, (20,), generator=g)
    with torch.no_grad():
        out = ref.generate(prompt[None], max_new_tokens=64, do_sample=False, min_new_tokens=64, pad_token_id=0)
    expected = out[0, 20:].tolist()
    got = llm.generate([prompt.tolist()], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
    assert got.token_ids == expected
    assert got.finish_reason == "length"


def test_greedy_equals_rescoring_own_output(pair):
    kind, llm, _ = pair
    prompt = llm.tokenizer.encode("The quick brown fox")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    logits = llm.score(prompt + out.token_ids)
    # The token generated at step i is the argmax of the logits at the position before it.
    predicted = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert predicted == out.token_ids
