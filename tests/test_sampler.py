"""The batched sampler and the SamplingParams fields it uses (fast, CPU)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from galerne import SamplingParams
from galerne.errors import InvalidParameter
from galerne.sampling.sampler import (
    SamplingRow,
    make_generator,
    min_tokens_masked_ids,
    process_logits,
    sample,
    sample_batch,
    sampling_probs,
)

INF = float("inf")


def row(params=None, prompt=(), output=(), *, seeded=True, masked=frozenset(), index=0, device="cpu"):
    params = params or SamplingParams()
    gen = make_generator(params, device, index) if seeded else None
    return SamplingRow(params, prompt, output, gen, frozenset(masked))


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(n=129), "n"),
        (dict(n=2.0), "n"),
        (dict(n=True), "n"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_p="x"), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=-2.01), "presence_penalty"),
        (dict(presence_penalty=math.nan), "presence_penalty"),
        (dict(frequency_penalty=3), "frequency_penalty"),
        (dict(frequency_penalty=-INF), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=INF), "repetition_penalty"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={3: 100.5}), "logit_bias"),
        (dict(logit_bias={3: -101}), "logit_bias"),
        (dict(logit_bias={3: math.nan}), "logit_bias"),
        (dict(logit_bias={3: "big"}), "logit_bias"),
        (dict(logit_bias={1.5: 1.0}), "logit_bias"),
        (dict(logit_bias={"abc": 1.0}), "logit_bias"),
        (dict(logit_bias={"3": 1.0, 3: 2.0}), "logit_bias"),
        (dict(logit_bias="3"), "logit_bias"),
        (dict(logit_bias=[(1, 2, 3)]), "logit_bias"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=1.0), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=True), "logprobs"),
        (dict(logprobs=1.0), "logprobs"),
        (dict(seed=2**64), "seed"),
        (dict(temperature=INF), "temperature"),
    ],
)
def test_new_fields_name_the_bad_field(kwargs, field):
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and str(e.value).startswith(field + ":")


def test_valid_values_and_defaults():
    d = SamplingParams()
    assert (d.n, d.min_p, d.presence_penalty, d.frequency_penalty, d.repetition_penalty) == (1, 0.0, 0.0, 0.0, 1.0)
    assert d.logit_bias is None and d.min_tokens == 0 and d.logprobs is None
    ok = SamplingParams(
        n=128, min_p=1.0, presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=0.5,
        logit_bias={"7": -100, 2: 100.0}, min_tokens=4, max_tokens=4, logprobs=20, seed=-5,
    )
    # logit_bias: sorted (id, bias) pairs, decimal-string keys accepted; the params stay hashable.
    assert ok.logit_bias == ((2, 100.0), (7, -100.0)) and ok.logit_bias_dict == {2: 100.0, 7: -100.0}
    assert SamplingParams(logit_bias=[(7, -100), (2, 100)]) == ok.__class__(logit_bias={2: 100, 7: -100})
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert hash(ok) == hash(SamplingParams(**{f: getattr(ok, f) for f in ok.__dataclass_fields__}))
    assert SamplingParams(min_tokens=10).min_tokens == 10  # no max_tokens: no upper bound here
    assert SamplingParams(logprobs=0).logprobs == 0


# --- greedy and the processing steps ----------------------------------------------------------


def test_greedy_rows_are_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    rows = [row(SamplingParams(temperature=0)) for _ in range(3)]
    rows += [row(SamplingParams(temperature=1.0, seed=i)) for i in range(2)] + [row(seeded=False)]
    out = sample_batch(logits, rows)
    assert out.token_ids[:3] == torch.argmax(logits[:3], dim=-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None
    # The single-row entry point of the dense path.
    assert sample(logits[4], SamplingParams(temperature=0)) == int(torch.argmax(logits[4]))


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]] * 4)
    prompt, output = (0, 1), (2, 2, 3)
    rows = [
        row(SamplingParams(repetition_penalty=2.0), prompt, output),
        row(SamplingParams(presence_penalty=0.5), prompt, output),
        row(SamplingParams(frequency_penalty=0.25), prompt, output),
        row(SamplingParams(), prompt, output),  # nothing on: untouched
    ]
    got = process_logits(logits, rows)
    # Repetition: prompt and output ids; positive divided, negative multiplied.
    assert got[0].tolist() == [1.0, -2.0, 0.25, 0.5, 0.0]
    # Presence: output ids only, once each.
    assert got[1].tolist() == [2.0, -1.0, 0.0, 0.5, 0.0]
    # Frequency: output ids only, times their count.
    assert got[2].tolist() == [2.0, -1.0, 0.0, 0.75, 0.0]
    assert torch.equal(got[3], logits[3])
    both = process_logits(logits[:1], [row(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                                                          repetition_penalty=2.0), prompt, output)])
    # Repetition first (0.25, 0.5), then presence and frequency.
    assert both[0].tolist() == [1.0, -2.0, 0.25 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 0.0]
    # Negative penalties encourage repeats.
    enc = process_logits(logits[:1], [row(SamplingParams(presence_penalty=-1.0), prompt, output)])
    assert enc[0].tolist() == [2.0, -1.0, 1.5, 2.0, 0.0]
    assert not torch.equal(logits, got) and logits[0].tolist() == [2.0, -1.0, 0.5, 1.0, 0.0]  # input not modified


def test_logit_bias_adds_and_can_force_a_token():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    p = SamplingParams(logit_bias={0: 5.0, 3: -1.5})
    got = process_logits(logits, [row(p), row()])
    assert got[0].tolist() == [5.0, 1.0, 2.0, 1.5] and got[1].tolist() == logits[1].tolist()
    force = SamplingParams(temperature=1.0, logit_bias={1: 100}, seed=0)
    rows = [row(force), row(SamplingParams(temperature=0, logit_bias={0: 100}))]
    for _ in range(20):
        assert sample_batch(logits, rows).token_ids == [1, 0]
    with pytest.raises(InvalidParameter) as e:
        sample_batch(logits[:1], [row(SamplingParams(logit_bias={4: 1.0}))])
    assert e.value.field == "logit_bias"


def test_min_tokens_masks_eos_and_stop_ids():
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(5,))
    assert min_tokens_masked_ids(p, 0, {2}) == {2, 5}
    assert min_tokens_masked_ids(p, 1, [2]) == {2, 5}
    assert min_tokens_masked_ids(p, 2, [2]) == frozenset()
    assert min_tokens_masked_ids(SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=[5]), 0, [2]) == {5}
    assert min_tokens_masked_ids(SamplingParams(), 0, [2]) == frozenset()

    logits = torch.tensor([[0.0, 1.0, 9.0, 3.0, 0.0, 8.0]])  # EOS (2) then stop id (5) most likely
    assert sample_batch(logits, [row(p, masked=min_tokens_masked_ids(p, 0, [2]))]).token_ids == [3]
    assert sample_batch(logits, [row(p, masked=min_tokens_masked_ids(p, 2, [2]))]).token_ids == [2]
    sampled = SamplingParams(temperature=1.0, seed=3, min_tokens=1)
    r = row(sampled, masked={2, 5, 99})  # ids outside the vocabulary are ignored
    assert all(t not in (2, 5) for t in (sample_batch(logits, [r]).token_ids[0] for _ in range(200)))
    assert process_logits(logits, [r])[0].tolist() == [0.0, 1.0, -INF, 3.0, 0.0, -INF]


# --- top-k / top-p / min-p support ------------------------------------------------------------


def _support(logits, **kw):
    return set((sampling_probs(logits[None], [SamplingParams(**kw)])[0] > 0).nonzero().flatten().tolist())


def _drawn(logits, n=400, **kw):
    p = SamplingParams(seed=0, **kw)
    r = row(p)
    return {sample_batch(logits[None], [r]).token_ids[0] for _ in range(n)}


# probs of exp(log p): 0.4, 0.3, 0.15, 0.1, 0.05
LOGITS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()


@pytest.mark.parametrize(
    "kw, support",
    [
        (dict(), {0, 1, 2, 3, 4}),
        (dict(top_k=0), {0, 1, 2, 3, 4}),
        (dict(top_k=-1), {0, 1, 2, 3, 4}),
        (dict(top_k=1), {0}),
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_k=5), {0, 1, 2, 3, 4}),
        (dict(top_k=50), {0, 1, 2, 3, 4}),
        (dict(top_p=0.39), {0}),  # mass before token 1 is 0.4 >= 0.39
        (dict(top_p=0.41), {0, 1}),
        (dict(top_p=0.5), {0, 1}),
        (dict(top_p=0.8), {0, 1, 2}),
        (dict(top_p=0.86), {0, 1, 2, 3}),
        (dict(top_p=1e-9), {0}),
        (dict(min_p=0.3), {0, 1, 2}),  # keep p >= 0.12
        (dict(min_p=0.5), {0, 1}),  # keep p >= 0.2
        (dict(min_p=1.0), {0}),
        (dict(top_k=4, top_p=0.8), {0, 1, 2}),
        # top-k renormalises before top-p: {0.4, 0.3} -> {0.571, 0.429}; top_p 0.5 keeps one.
        (dict(top_k=2, top_p=0.5), {0}),
        (dict(top_p=0.86, min_p=0.3), {0, 1, 2}),
    ],
)
def test_cuts_keep_exactly_the_expected_support(kw, support):
    assert _support(LOGITS, **kw) == support
    assert _drawn(LOGITS, **kw) == support


def test_cuts_apply_after_temperature():
    # Temperature 0.5 squares the probabilities: 0.16, 0.09, ... (normalised ~0.55, 0.31, 0.08, 0.03, 0.01).
    assert _support(LOGITS, temperature=0.5, top_p=0.8) == {0, 1}
    assert _support(LOGITS, temperature=0.5, min_p=0.1) == {0, 1, 2}


def test_rows_with_a_cut_off_are_untouched_in_a_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 300)
    params = [SamplingParams(top_k=5), SamplingParams(), SamplingParams(top_p=0.3), SamplingParams(min_p=0.2)]
    probs = sampling_probs(logits, params)
    assert torch.equal(probs[1], torch.softmax(logits[1], dim=-1))
    assert (probs[0] > 0).sum() == 5 and (probs[2] > 0).sum() < 300 and (probs[3] > 0).sum() < 300


# --- seeds and batch independence -------------------------------------------------------------


def test_sample_matches_torch_multinomial():
    """The dense path's draw is unchanged: the same tokens as torch.multinomial."""
    torch.manual_seed(2)
    p = SamplingParams(temperature=0.7, seed=123)
    g1, g2 = make_generator(p, "cpu"), make_generator(p, "cpu")
    for _ in range(30):
        logits = torch.randn(1000)
        ref = int(torch.multinomial(torch.softmax(logits / 0.7, dim=-1), 1, generator=g2))
        assert sample(logits, p, g1) == ref


def _run_seeded(step_logits, mixer):
    """Sample a seeded row over the steps; ``mixer(step)`` gives the other rows and where ours goes."""
    ours = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, min_p=0.01, presence_penalty=0.3, seed=1234)
    gen = make_generator(ours, "cpu")
    out = []
    for step, logits in enumerate(step_logits):
        others, pos = mixer(step)
        me = SamplingRow(ours, (1, 2, 3), tuple(out), gen)
        rows = others[:pos] + [me] + others[pos:]
        batch = torch.stack([torch.randn_like(logits) * 3 for _ in others[:pos]] + [logits]
                            + [torch.randn_like(logits) * 3 for _ in others[pos:]])
        out.append(sample_batch(batch, rows).token_ids[pos])
    return out


def test_seeded_row_is_the_same_alone_and_in_any_batch():
    V = 2000
    gen = torch.Generator().manual_seed(99)
    step_logits = [torch.randn(V, generator=gen) * 2 for _ in range(60)]
    alone = _run_seeded(step_logits, lambda step: ([], 0))

    rng = random.Random(5)
    other_gens = {s: make_generator(SamplingParams(seed=s), "cpu") for s in (1, 2)}

    def mixer(step):
        pool = [
            SamplingRow(SamplingParams(temperature=0), (), (), None),
            SamplingRow(SamplingParams(temperature=1.0), (4,), (), None),  # unseeded: global RNG
            SamplingRow(SamplingParams(temperature=1.0, seed=1, logprobs=3), (), (), other_gens[1]),
            SamplingRow(SamplingParams(temperature=0.5, seed=2, top_k=3, repetition_penalty=1.2), (5,), (6,),
                        other_gens[2]),
            SamplingRow(SamplingParams(temperature=0, logit_bias={0: 50}), (), (), None),
        ]
        others = rng.sample(pool, rng.randint(0, len(pool)))
        return others, rng.randint(0, len(others))

    torch.manual_seed(7)  # a different global RNG state must not matter either
    mixed = _run_seeded(step_logits, mixer)
    assert mixed == alone
    assert len(set(alone)) > 10  # really sampled, not a degenerate distribution


def test_seeds_differ_and_n_index_offsets_the_seed():
    logits = torch.zeros(1, 1000)
    p = SamplingParams(seed=10)
    draw = lambda g: [sample_batch(logits, [SamplingRow(p, (), (), g)]).token_ids[0] for _ in range(10)]
    a, b = draw(make_generator(p, "cpu")), draw(make_generator(p, "cpu"))
    c = draw(make_generator(p, "cpu", index=1))
    assert a == b and a != c
    assert c == draw(make_generator(SamplingParams(seed=11), "cpu"))
    assert make_generator(SamplingParams(), "cpu") is None
    make_generator(SamplingParams(seed=2**64 - 1), "cpu", index=3)  # wraps instead of failing


# --- logprobs ---------------------------------------------------------------------------------


def test_logprobs_are_of_the_processed_logits():
    torch.manual_seed(3)
    logits = torch.randn(4, 100)
    rows = [
        row(SamplingParams(temperature=0, logprobs=5, presence_penalty=1.0, logit_bias={7: 3.0}), (), (1, 1, 2)),
        row(SamplingParams(temperature=0.3, top_k=3, seed=4, logprobs=0), masked={int(logits[1].argmax())}),
        row(SamplingParams(temperature=1.0, seed=5)),  # no logprobs asked
        row(SamplingParams(temperature=2.0, top_p=0.5, seed=6, logprobs=20)),
    ]
    out = sample_batch(logits, rows)
    ref = torch.log_softmax(process_logits(logits, rows), dim=-1)  # before temperature and cuts
    assert len(out.logprobs) == 4
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(float(ref[i, tok]), abs=1e-6)
    assert out.token_ids[0] == int(ref[0].argmax())
    assert out.top_logprobs[2] is None and out.top_logprobs[1] == []
    for i, k in ((0, 5), (3, 20)):
        top = out.top_logprobs[i]
        assert len(top) == k
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        vals, ids = torch.topk(ref[i], k)
        assert [t for t, _ in top] == ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(vals.tolist(), abs=1e-6)
    # Greedy row: the chosen token is the top alternative.
    assert out.top_logprobs[0][0][0] == out.token_ids[0]
    assert out.top_logprobs[0][0][1] == pytest.approx(out.logprobs[0])


def test_logprobs_longer_than_the_vocabulary():
    out = sample_batch(torch.tensor([[0.0, 1.0, 2.0]]), [row(SamplingParams(temperature=0, logprobs=20))])
    assert [t for t, _ in out.top_logprobs[0]] == [2, 1, 0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        sample_batch(torch.zeros(2, 5), [row()])


# --- on the GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_row_is_batch_independent_on_cuda():
    V = 32768
    ours = SamplingParams(temperature=0.8, top_p=0.9, top_k=100, min_p=0.02, seed=77)
    gen = torch.Generator(device="cpu").manual_seed(0)
    steps = [(torch.randn(V, generator=gen) * 3).cuda() for _ in range(40)]
    g_alone, g_mixed = make_generator(ours, "cuda"), make_generator(ours, "cuda")
    for step, logits in enumerate(steps):
        alone = sample_batch(logits[None], [SamplingRow(ours, (), (), g_alone)]).token_ids[0]
        others = torch.randn(7, V, device="cuda") * 3
        batch = torch.cat([others[:3], logits[None], others[3:]])
        rows = [SamplingRow(SamplingParams(temperature=0), (), (), None),
                SamplingRow(SamplingParams(temperature=1.0), (), (), None),
                SamplingRow(SamplingParams(seed=step), (), (), make_generator(SamplingParams(seed=step), "cuda")),
                SamplingRow(ours, (), (), g_mixed)]
        rows += [SamplingRow(SamplingParams(temperature=0.7, top_p=0.5), (), (), None)] * 4
        assert sample_batch(batch, rows).token_ids[3] == alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_step_runs_on_cuda_as_on_cpu():
    torch.manual_seed(8)
    logits = torch.randn(5, 4096) * 3
    ps = [
        SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2,
                       logit_bias={5: 10.0}, logprobs=4),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=1, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0, min_tokens=3),
        SamplingParams(temperature=1.2, top_p=0.5, seed=2),
    ]
    def rows(device):
        return [SamplingRow(p, (1, 2, 3), (3, 4, 4, 9), make_generator(p, device), frozenset({7}) if i == 3 else frozenset())
                for i, p in enumerate(ps)]
    cpu, gpu = process_logits(logits, rows("cpu")), process_logits(logits.cuda(), rows("cuda"))
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)
    probs_cpu = sampling_probs(cpu[[1, 2, 4]], [ps[1], ps[2], ps[4]])
    probs_gpu = sampling_probs(gpu[[1, 2, 4]], [ps[1], ps[2], ps[4]])
    assert torch.equal(probs_cpu > 0, probs_gpu.cpu() > 0)
    out_cpu, out_gpu = sample_batch(logits, rows("cpu")), sample_batch(logits.cuda(), rows("cuda"))
    assert [out_cpu.token_ids[i] for i in (0, 3)] == [out_gpu.token_ids[i] for i in (0, 3)]
    assert out_gpu.logprobs[1] <= 0 and out_gpu.top_logprobs[1] == [] and len(out_gpu.top_logprobs[0]) == 4
    for i, tok in enumerate(out_gpu.token_ids):
        assert probs_gpu is not None and (i not in (1, 2, 4) or probs_gpu[[1, 2, 4].index(i), tok] > 0)


def test_penalty_context_outside_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="token id 9 is outside"):
        process_logits(torch.zeros(1, 5), [row(SamplingParams(repetition_penalty=1.5), (1, 9))])
    # Token ids may come as tensors too.
    got = process_logits(torch.ones(1, 5), [row(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0),
                                                torch.tensor([1]), torch.tensor([2, 2]))])
    assert got[0].tolist() == [1.0, 0.5, 0.5 - 2.0, 1.0, 1.0]


def test_processing_never_modifies_the_callers_logits():
    # The CPU decode kernel hands the sampler its own reused buffer: processing
    # copies when a row changes something, and returns the logits as they are otherwise.
    logits = torch.randn(3, 10)
    before = logits.clone()
    changed = process_logits(logits, [row(SamplingParams(logit_bias={2: 5.0}, repetition_penalty=1.5), (1, 4), (4,)),
                                      row(masked={3}), row(SamplingParams(presence_penalty=1.0), (), (7,))])
    assert torch.equal(logits, before) and not torch.equal(changed, before)
    assert process_logits(logits, [row(), row(), row()]) is logits
    out = sample_batch(logits, [row(SamplingParams(temperature=0)), row(SamplingParams(temperature=0)),
                                row(SamplingParams(temperature=0, logprobs=2))])
    assert torch.equal(logits, before)
    assert out.token_ids == logits.argmax(-1).tolist()


# ------------------------------------------------------------------ extremes of every number


@pytest.mark.parametrize("kw", [
    dict(temperature=1e-45), dict(temperature=5e-324), dict(temperature=1e-38),
    dict(temperature=1.0, top_p=1e-300), dict(temperature=1.0, top_p=5e-324),
    dict(temperature=1e-45, top_p=1e-300, top_k=1, min_p=1e-300),
])
def test_values_that_underflow_act_as_their_limit(kw):
    """A temperature or top_p that is 0 in float32 is greedy or top-1, never NaN (which made
    token 0 win), with or without a grammar's mask."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 10
    logits[:, 0] = -5.0  # token 0 is never the best: NaN would pick it
    greedy = logits.argmax(dim=-1).tolist()
    rows = [SamplingRow(SamplingParams(**kw), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    assert sample_batch(logits, rows).token_ids == greedy
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 7, 11]] = True
    best = max((3, 7, 11), key=lambda t: logits[0, t].item())
    row = SamplingRow(SamplingParams(**kw), allowed=allowed)
    assert sample_batch(logits[:1], [row]).token_ids == [best]


def test_huge_temperature_stays_in_the_grammar():
    # 1e308 is inf in float32: -inf / inf would be NaN.
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 7]] = True
    rows = [SamplingRow(SamplingParams(temperature=1e308), allowed=allowed) for _ in range(64)]
    tokens = sample_batch(torch.randn(64, 50), rows).token_ids
    assert set(tokens) == {3, 7}  # uniform over the allowed two


def test_tiny_repetition_penalty_favours_seen_tokens_without_nan():
    logits = torch.full((1, 50), -1.0)
    logits[0, 9] = 5.0
    logits[0, [20, 30]] = torch.tensor([1.0, 2.0])
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=1)):
        row = SamplingRow(SamplingParams(repetition_penalty=1e-300, logprobs=2, **kw), prompt_token_ids=[20, 30, 40])
        out = sample_batch(logits, [row])
        assert out.token_ids[0] in (20, 30)  # positive and seen: pushed to the top
        assert all(math.isfinite(lp) for _, lp in out.top_logprobs[0]) and math.isfinite(out.logprobs[0])


def test_masked_tokens_are_not_alternatives():
    """top_logprobs with a grammar: forbidden tokens are left out, never -inf (not JSON)."""
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 7]] = True
    row = SamplingRow(SamplingParams(temperature=0.0, logprobs=5), allowed=allowed)
    out = sample_batch(torch.randn(1, 50), [row])
    assert sorted(t for t, _ in out.top_logprobs[0]) == [3, 7]
    assert all(math.isfinite(lp) for _, lp in out.top_logprobs[0])


def test_a_cut_row_draws_from_its_support_with_the_right_frequencies():
    """On CPU a row cut to a small support draws one exponential per supported token
    only (not V): the same distribution, the renormalised probabilities of the support."""
    torch.manual_seed(3)
    logits = torch.randn(1, 1000).repeat(4000, 1)
    params = SamplingParams(temperature=1.0, top_k=4)
    tokens = sample_batch(logits, [SamplingRow(params) for _ in range(4000)]).token_ids
    top = torch.topk(logits[0], 4)
    expected = torch.softmax(top.values, dim=-1)
    counts = torch.tensor([tokens.count(t) for t in top.indices.tolist()], dtype=torch.float32)
    assert counts.sum() == 4000  # nothing outside the support
    assert torch.allclose(counts / 4000, expected, atol=0.03), (counts / 4000, expected)
    # Seeded: the same tokens alone or in any batch, as before.
    seeded = SamplingParams(temperature=1.0, top_p=0.5, seed=7)
    alone = [sample_batch(logits[:1], [SamplingRow(seeded, generator=make_generator(seeded, "cpu"))]).token_ids[0]
             for _ in range(3)]
    crowd = [SamplingRow(SamplingParams()) for _ in range(5)]
    mixed = sample_batch(logits[:6], crowd[:2] + [SamplingRow(seeded, generator=make_generator(seeded, "cpu"))] + crowd[2:])
    assert mixed.token_ids[2] == alone[0] == alone[1] == alone[2]


def test_first_max_is_torchs_first_maximum():
    from galerne.sampling.sampler import first_max

    g = torch.Generator().manual_seed(0)
    for b in (1, 3, 9):
        x = torch.randn(b, 32768, generator=g)
        assert torch.equal(first_max(x), x.max(dim=-1).indices)
        assert first_max(x).dtype == torch.int64
    x = torch.tensor([[1.0, 5.0, 5.0, 2.0], [float("-inf")] * 4, [0.0, float("nan"), 9.0, float("nan")],
                      [3.0, 3.0, 3.0, 3.0]])
    assert first_max(x).tolist() == [1, 0, 1, 0] == x.max(dim=-1).indices.tolist()
    wide = torch.randn(4, 64, generator=g)
    assert torch.equal(first_max(wide[:, ::2]), wide[:, ::2].max(dim=-1).indices)  # not contiguous
    assert torch.equal(first_max(wide.bfloat16()), wide.bfloat16().max(dim=-1).indices)  # not float32: torch's
