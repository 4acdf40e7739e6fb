"""Many adapters served unmerged in one batch: every row of a step through its own
adapter (or none) gives what the model with that adapter merged gives alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from galerne import LLM, SamplingParams
from galerne.engine.block_manager import BlockManager
from galerne.engine.scheduler import Scheduler
from galerne.engine.sequence import Sequence
from galerne.errors import InvalidParameter, ModelLoadError
from galerne.models.lora import MULTI_TARGETS, MultiLoRALinear, apply_lora, lora_modules

# name -> (rank, targets, layout): different ranks, target sets and layouts.
SPECS = {
    "a": (4, ("wq", "wk", "wo", "w2"), "peft"),
    "b": (8, ("wv", "w1", "w3", "wq"), "mistral"),
    "c": (2, MULTI_TARGETS, "peft"),
}
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
TOL = 1e-4


def make_adapter(base_folder, path, rank, targets, layout, seed):
    """A random adapter of ``rank`` on ``targets``, saved in ``layout``; A and B both
    non-zero, large enough to change the greedy tokens."""
    from galerne.weights.adapters import save_adapter

    llm = LLM(base_folder, device="cpu")
    apply_lora(llm.model, rank=rank, alpha=2.0 * rank, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(llm.model).values():
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    save_adapter(llm.model, path, layout=layout)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return tiny_factory("mistral")[0]


@pytest.fixture(scope="module")
def paths(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny, root / name, rank, targets, layout, seed)
            for seed, (name, (rank, targets, layout)) in enumerate(SPECS.items(), start=1)}


@pytest.fixture(scope="module")
def merged(tiny, paths):
    """The references: each adapter merged, alone; None: the base."""
    out = {name: LLM(tiny, device="cpu", adapter=path) for name, path in paths.items()}
    out[None] = LLM(tiny, device="cpu")
    return out


def prompts():
    # Lengths across the 16-token step budget: chunked prefills next to decodes.
    return [list(range(10, 10 + n)) for n in (37, 5, 23, 18, 9, 30)]


def check_against_merged(outs, names, merged, prompt_logprobs=False):
    for out, name in zip(outs, names):
        ref = merged[name].generate([out.prompt_token_ids], GREEDY if not prompt_logprobs else
                                    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0,
                                                   prompt_logprobs=0))[0]
        assert out.token_ids == ref.token_ids, name
        got, want = out.outputs[0].logprobs, ref.outputs[0].logprobs
        assert max(abs(x - y) for x, y in zip(got, want)) < TOL, name
        if prompt_logprobs:
            diffs = [abs(x.logprob - y.logprob) for x, y in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:])]
            assert max(diffs) < TOL, name


def test_adapters_change_the_model(merged):
    ids = prompts()[0]
    base = merged[None].score(ids)
    for name in SPECS:
        assert (merged[name].score(ids) - base).abs().max().item() > 1.0, name


def test_mixed_batch_equals_each_adapter_merged_alone(tiny, paths, merged):
    llm = LLM(tiny, device="cpu", adapters={"a": paths["a"], "b": paths["b"]}, max_num_batched_tokens=16, max_loras=2)
    assert [a.name for a in llm.adapters()] == ["a", "b"]
    names = ["a", "b", None, "a", "b", None]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    outs = llm.generate(prompts(), params, adapter=names)
    check_against_merged(outs, names, merged, prompt_logprobs=True)
    # Without prompt logprobs (the prefix cache on), and scoring without the engine.
    check_against_merged(llm.generate(prompts(), GREEDY, adapter=names), names, merged)
    ids = prompts()[2]
    for name in ("a", "b", None):
        assert (llm.score(ids, adapter=name) - merged[name].score(ids)).abs().max().item() < TOL


def test_more_adapters_in_flight_than_slots(tiny, paths, merged):
    llm = LLM(tiny, device="cpu", adapters=paths, max_num_batched_tokens=16, max_loras=2)
    seen = []
    slots_for = llm.engine.adapters.slots_for

    def spy(keys, keep=frozenset()):
        seen.append({k for k in keys if k is not None})
        return slots_for(keys, keep)

    llm.engine.adapters.slots_for = spy
    names = ["a", "b", "c", None, "c", "a"]
    check_against_merged(llm.generate(prompts(), GREEDY, adapter=names), names, merged)
    assert max(len(s) for s in seen) == 2  # never more adapters in a step than slots
    assert {k.name for s in seen for k in s} == {"a", "b", "c"}
    assert llm.engine.stats()["adapter_swaps"] >= 3  # c took a slot one of a, b had


def test_prefix_cache_never_shared_across_adapters(tiny, paths, merged):
    llm = LLM(tiny, device="cpu", adapters={"a": paths["a"], "b": paths["b"]}, block_size=4)
    ids = prompts()[0]

    def hits():
        return llm.engine.stats()["prefix_cache_hit_tokens"]

    for name in ("a", "b", None):
        before = hits()
        check_against_merged(llm.generate([ids], GREEDY, adapter=name), [name], merged)
        assert hits() == before, name  # the same prompt, another adapter: no block reused
    before = hits()
    check_against_merged(llm.generate([ids], GREEDY, adapter="b"), ["b"], merged)
    assert hits() > before  # the same adapter again: its own blocks are reused


def test_load_unload_reload(tiny, paths, merged):
    llm = LLM(tiny, device="cpu", block_size=4)
    ids = prompts()[0]
    info = llm.load_adapter("x", paths["a"])
    assert (info.name, info.layout, info.rank, info.targets) == ("x", "peft", 4, ("w2", "wk", "wo", "wq"))
    check_against_merged(llm.generate([ids], GREEDY, adapter="x"), ["a"], merged)

    # Unloading while a request runs through it: the request finishes through it,
    # new ones are refused at once, and the name can be loaded again meanwhile.
    stream = llm.stream(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), adapter="x")
    first = next(stream)
    llm.unload_adapter("x")
    assert llm.adapters() == []
    with pytest.raises(InvalidParameter) as e:
        llm.generate([ids], GREEDY, adapter="x")
    assert e.value.field == "adapter" and "'x'" in str(e.value)
    llm.load_adapter("x", paths["b"])  # the same name, another adapter
    rest = [t for out in stream for t in out.token_ids]
    assert first.token_ids + rest == merged["a"].generate([ids], GREEDY)[0].token_ids
    assert len(llm.engine.adapters._loaded) == 1  # the first "x" went with its last request
    # The new "x" never meets the KV blocks the old one left in the prefix cache.
    check_against_merged(llm.generate([ids], GREEDY, adapter="x"), ["b"], merged)
    llm.unload_adapter("x")
    with pytest.raises(InvalidParameter):
        llm.unload_adapter("x")
    llm.load_adapter("x", paths["a"])
    check_against_merged(llm.generate([ids], GREEDY, adapter="x"), ["a"], merged)


def test_bad_adapters_are_refused_and_change_nothing(tiny, tiny_factory, paths, merged, tmp_path):
    llm = LLM(tiny, device="cpu", adapters={"a": paths["a"]}, max_lora_rank=4)
    before = llm.adapters()

    def refused(name, path, match, error=ModelLoadError):
        with pytest.raises(error, match=match) as e:
            llm.load_adapter(name, path)
        assert llm.adapters() == before
        return e.value

    # Rank above the limit: the message names the rank, the limit and the setting.
    e = refused("b", paths["b"], r"rank 8 .*4 \(max_lora_rank\)")
    assert "lora.safetensors" in str(e)
    # Malformed: not a safetensors file, a stray tensor, a lone lora_A.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "lora.safetensors").write_bytes(b"not a safetensors file")
    refused("j", tmp_path / "junk", "cannot read safetensors")
    tensors = load_file(paths["c"] / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "adapter_config.json").write_text((paths["c"] / "adapter_config.json").read_text())
    save_file({k: v for k, v in tensors.items() if k != name}, str(tmp_path / "lone" / "adapter_model.safetensors"))
    assert refused("l", tmp_path / "lone", "lora_B is missing").tensor == name
    refused("n", tmp_path / "nowhere", "no such adapter")
    # A config whose numbers are not numbers: named, not a ValueError from deep inside.
    for key, value in (("r", "four"), ("lora_alpha", [8]), ("lora_alpha", float("nan")), ("r", True)):
        bad = tmp_path / f"bad-{key}-{value}"
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes((paths["c"] / "adapter_model.safetensors").read_bytes())
        cfg = json.loads((paths["c"] / "adapter_config.json").read_text()) | {key: value}
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        assert refused("x", bad, f"bad '{key}'").path.endswith("adapter_config.json")
    # For another base: shapes that do not match this model's linears.
    other, _ = tiny_factory("head-dim")
    make_adapter(other, tmp_path / "other", 2, ("wq", "wo"), "mistral", 5)
    e = refused("o", tmp_path / "other", "another base model")
    assert e.tensor.startswith("layers.0.attention.w")
    # A name already loaded, a bad name.
    refused("a", paths["c"], "already loaded", InvalidParameter)
    refused(" a", paths["c"], "name", InvalidParameter)
    # An unknown adapter in a request: refused before the engine, naming the field.
    with pytest.raises(InvalidParameter) as e:
        llm.generate([prompts()[1]], GREEDY, adapter="nope")
    assert e.value.field == "adapter" and "'a'" in str(e.value)  # says what is loaded
    assert not llm.engine.has_unfinished()
    # What was loaded still serves as before.
    check_against_merged(llm.generate(prompts()[:2], GREEDY, adapter=["a", None]), ["a", None], merged)


def test_slots_layout(tiny, paths):
    """The contract the kernels read: per target (S, R, in) and (S, out, R), contiguous,
    rank r in [:r] with the scaling in B, zeros elsewhere and for targets it lacks."""
    llm = LLM(tiny, device="cpu", adapters={"b": paths["b"]}, max_loras=3, max_lora_rank=16)
    llm.generate([prompts()[1]], GREEDY, adapter="b")
    lora = llm.engine.runner.lora
    layers = lora.layers()
    assert len(layers) == 2 and [len(mods) for mods in layers] == [7, 7]
    wq, wk = llm.model.layers[0].attention.wq, llm.model.layers[0].attention.wk
    assert isinstance(wq, MultiLoRALinear) and layers[0][0] is wq and layers[0][1] is wk
    assert wq.lora_A.shape == (3, 16, 64) and wq.lora_B.shape == (3, 64, 16)
    assert wq.lora_A.is_contiguous() and wq.lora_B.is_contiguous() and wq.lora_A.dtype == wq.weight.dtype
    slot = wq.ranks.index(8)
    a, b = llm.engine.adapters._loaded[next(iter(llm.engine.adapters._loaded))].weights.tensors[
        "layers.0.attention.wq"]
    assert torch.equal(wq.lora_A[slot, :8], a) and torch.allclose(wq.lora_B[slot, :, :8], 2.0 * b)
    assert not wq.lora_A[slot, 8:].any() and not wq.lora_B[slot, :, 8:].any()
    assert wk.ranks[slot] == 0 and not wk.lora_A[slot].any() and not wk.lora_B[slot].any()
    # The state dict is the base model's, unchanged by the slots.
    assert "layers.0.attention.wq.weight" in llm.model.state_dict()
    assert not any("lora" in k for k in llm.model.state_dict())


def test_cpu_kernel_runs_decode_steps_with_and_without_adapters(tiny, paths, merged):
    """Decode steps go through the CPU kernel, which reads the slots' stacks: rows with
    an adapter carry their slot, and the tokens still equal the merged model's."""
    from conftest import has_compiler

    if not has_compiler():
        pytest.skip("no C++ compiler: no CPU kernel")
    llm = LLM(tiny, device="cpu", adapters={"a": paths["a"], "b": paths["b"]})
    decoder = llm.engine.runner.cpu_decoder
    if decoder is None:
        pytest.skip("the CPU kernel is not available here")
    assert decoder.slots == llm.engine.settings.max_loras  # rebuilt on the wrapped model
    calls = []

    def spy(tokens, entries, slots=None):
        calls.append(slots)
        return decoder(tokens, entries, slots)

    spy.max_batch = decoder.max_batch
    llm.engine.runner.cpu_decoder = spy
    check_against_merged(llm.generate([prompts()[1]], GREEDY), [None], merged)
    assert calls and all(c is None for c in calls)  # base-only decodes: no slots
    calls.clear()
    names = ["a", None, "b"]
    check_against_merged(llm.generate(prompts()[:3], GREEDY, adapter=names), names, merged)
    together = [c for c in calls if c is not None and len(c) == 3]  # the three decoding in one step
    assert together and all(len(set(c) - {-1}) == 2 and -1 in c for c in together)


def test_scheduler_never_runs_more_adapters_than_slots():
    """Plain Python: admission waits for a slot; base sequences pass a head that waits."""
    params = SamplingParams(max_tokens=4)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=16, max_num_batched_tokens=64, max_adapters=2)
    seqs = [Sequence([1, 2, 3], params, adapter=k) for k in ("A", "B", "C", None, "A", None)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    ran = [s.seq for s in out.scheduled]
    # C waits for a slot; the base ones behind it go; A's newcomer queues behind C.
    assert ran == [seqs[0], seqs[1], seqs[3], seqs[5]]
    assert sched.active_adapters() == {"A", "B"}
    sched.advance(out)
    sched.finish(seqs[1], "stop")  # B's last sequence ends: its slot frees
    out = sched.schedule()
    assert [s.seq for s in out.scheduled if s.num_new_tokens == 3] == [seqs[2], seqs[4]]
    assert sched.active_adapters() == {"A", "C"}
    with pytest.raises(InvalidParameter, match="max_loras"):
        Scheduler(BlockManager(8, 4)).add(Sequence([1], params, adapter="A"))
