"""galerne's native CPU decode kernel (galerne/kernels) against the torch path.

The kernel runs a whole decode step (every layer, the cache writes, the logits) in
one call; here its logits and the keys/values it writes are compared with the
model's own forward through ``TorchPagedAttention`` on the same cache, on shapes
chosen to reach the kernel's edge cases: rows and inputs that are not multiples
of the vector width, grouped-query heads, sliding windows, several sequences of
different lengths over shuffled blocks.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
from torch import nn

from galerne import LLM, SamplingParams
from galerne.engine.paged import BatchMetadata, PagedKVCache, TorchPagedAttention
from galerne.kernels import cpu as cpu_kernels

from conftest import build_hf, has_compiler

pytestmark = pytest.mark.skipif(not has_compiler(), reason="no C++ compiler to build the kernel with")

BLOCK = 4
# hidden 72 and intermediate 100 leave tails after the 16- and 32-wide vector loops
# and after the groups of rows; 6 heads over 2 kv heads; head_dim 18.
ODD = dict(hidden_size=72, intermediate_size=100, num_attention_heads=6, num_key_value_heads=2, head_dim=18)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    build_hf("mistral", folder, seed=3, **ODD)
    return folder


@pytest.fixture(scope="module")
def window_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd-window")
    build_hf("mistral", folder, seed=4, sliding_window=6, **ODD)
    return folder


def test_the_kernel_builds_here():
    assert cpu_kernels.load() is not None


def one_step(model, lens: list[int], seed: int = 0, ext=None, slots=None, lora=None, int8_dot: bool = False):
    """Decode one token for sequences whose contexts (random keys/values in the
    cache) have ``lens`` tokens; returns (kernel logits, torch logits, the two caches).
    ``slots``: each sequence's adapter slot, passed to the kernel and to the model's
    SlotLoRA wrappers; ``lora``: stacks given to the decoder explicitly; ``int8_dot``:
    the kernel's q4 matrices take int8-rounded inputs (the torch side is the model's)."""
    args = model.args
    dtype = model.norm.weight.dtype  # the activations' (and cache's), quantized or not
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-(n + 1) // BLOCK) for n in lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()  # tables point all over the cache
    tables, i = [], 0
    for k in blocks_needed:
        tables.append(order[i : i + k])
        i += k
    ours = PagedKVCache(args, num_blocks, BLOCK, dtype, torch.device("cpu"))
    ours.k.copy_(torch.randn(ours.k.shape, generator=g))
    ours.v.copy_(torch.randn(ours.v.shape, generator=g))
    ref = PagedKVCache(args, num_blocks, BLOCK, dtype, torch.device("cpu"))
    ref.k.copy_(ours.k), ref.v.copy_(ours.v)
    tokens = torch.randint(3, args.vocab_size, (len(lens),), generator=g).tolist()
    entries = [(t, n, 1) for t, n in zip(tables, lens)]

    if ext is None and lora is None:
        decoder = cpu_kernels.CpuDecoder.create(model, ours.k, ours.v, int8_dot=int8_dot)
    else:
        decoder = cpu_kernels.CpuDecoder(ext or cpu_kernels.load(), model, ours.k, ours.v, lora=lora, int8_dot=int8_dot)
    assert decoder is not None
    for m in model.modules():
        if isinstance(m, SlotLoRA):
            m.slots = torch.tensor([-1] * len(lens) if slots is None else slots)
    with torch.inference_mode():
        got = decoder(tokens, entries) if slots is None else decoder(tokens, entries, slots)
        meta = BatchMetadata.build(entries, BLOCK, torch.device("cpu"))
        hidden = model(torch.tensor(tokens), meta.positions, TorchPagedAttention(ref, meta))
        expected = model.logits(hidden).float()
    return got, expected, ours, ref


@pytest.mark.parametrize("lens", [[0], [5], [0, 7, 37, 12], [4, 0, 7, 37, 12, 3, 20, 9, 1, 30]])  # 10: tiles of 4, 4, 2
def test_float32_step_equals_the_torch_path(odd_folder, lens):
    model = LLM(odd_folder, device="cpu", dtype="float32").model
    got, expected, ours, ref = one_step(model, lens)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.k, ref.k, rtol=1e-5, atol=1e-5)  # the new keys and values, written
    torch.testing.assert_close(ours.v, ref.v, rtol=1e-5, atol=1e-5)


def test_sliding_window_step_equals_the_torch_path(window_folder):
    model = LLM(window_folder, device="cpu", dtype="float32").model
    assert model.args.window(0) == 6
    got, expected, _, _ = one_step(model, [3, 6, 29], seed=1)  # inside, at and past the window
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def ministral3_folder(tmp_path_factory):
    """Ministral 3 on the odd shapes: YaRN (magnitude not 1) and llama-4 query scaling
    with an original context of 8, so the positions below span several scaling steps."""
    folder = tmp_path_factory.mktemp("odd-ministral3")
    rope = dict(rope_type="yarn", rope_theta=1e6, factor=64.0, original_max_position_embeddings=8,
                beta_fast=32.0, beta_slow=1.0, llama_4_scaling_beta=0.3)
    build_hf("ministral3", folder, seed=5, rope_parameters=rope, **ODD)
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ministral3_rope_and_query_scaling_step_equals_the_torch_path(ministral3_folder, dtype):
    model = LLM(ministral3_folder, device="cpu", dtype=dtype).model
    assert model.args.yarn is not None and model.args.query_scaling is not None
    got, expected, ours, ref = one_step(model, [0, 7, 8, 37, 100], seed=2)  # before, at and past the steps
    tol = 1e-4 if dtype == "float32" else 0.15
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.k.float(), ref.k.float(), rtol=tol, atol=tol)


def test_per_layer_windows_step_equals_the_torch_path(tmp_path):
    build_hf("ministral", tmp_path, seed=6, **{**ODD, "sliding_window": 5,
                                              "layer_types": ["full_attention", "sliding_attention"]})
    model = LLM(tmp_path, device="cpu", dtype="float32").model
    assert [model.args.window(i) for i in range(2)] == [None, 5]
    got, expected, _, _ = one_step(model, [2, 5, 23], seed=3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_step_is_close_to_the_torch_path(odd_folder):
    model = LLM(odd_folder, device="cpu", dtype="bfloat16").model
    got, expected, ours, ref = one_step(model, [0, 9, 30, 4, 17], seed=2)
    # The kernel keeps activations in float32 where torch rounds each op to bf16:
    # close, not equal.
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.05 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 2 / 3
    for a, b in ((ours.k, ref.k), (ours.v, ref.v)):  # later layers' keys inherit the rounding: relative to scale
        assert (a.float() - b.float()).abs().max() < 0.03 * b.float().abs().max()


@pytest.mark.slow  # a second build of the kernel, for another ISA (about 30 s the first time)
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX2 baseline is an x86-64 level")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_portable_loops_on_an_avx2_build(odd_folder, dtype):
    """Built for x86-64-v3 (AVX2, no AVX512), the kernel runs the loops that laptops
    without AVX512 run, which a native build on this machine never does."""
    ext = cpu_kernels._build(march="x86-64-v3")
    model = LLM(odd_folder, device="cpu", dtype=dtype).model
    lens = [0, 7, 37, 12, 3, 20]
    for slots in (None, [1, -1, 0, 2, 0, 1]):  # without adapters, then with LoRA rows
        if slots is not None:
            add_lora(model)
        got, expected, ours, ref = one_step(model, lens, seed=5, ext=ext, slots=slots)
        if dtype == "float32":
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.k, ref.k, rtol=1e-5, atol=1e-5)
        else:
            assert (got - expected).abs().max() < 0.05 * expected.abs().max()


# ------------------------------------------------------------------ batched LoRA rows


class SlotLoRA(nn.Module):
    """A stand-in for galerne.models.lora's MultiLoRALinear (tests only): the base
    linear at ``.base``, every slot's stacks at ``.lora_A`` (S, R, in) and ``.lora_B``
    (S, out, R); its forward adds each row's delta B[s] (A[s] x) for the slots set
    in ``.slots`` (one per row, -1 for none), computed in torch."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b)
        self.slots = None

    def forward(self, x):
        y = self.base(x)
        rows = [y[i] + self.lora_B[s] @ (self.lora_A[s] @ x[i]) if s >= 0 else y[i]
                for i, s in enumerate(self.slots.tolist())]
        return torch.stack(rows)


RANKS = (18, 5, 18)  # slot 1 zero-padded from 5 to 18; 18: tails past 16 ranks and groups of 4


def add_lora(model, seed: int = 0, slots: int = 3):
    """Wrap the model's linears in SlotLoRA: layer 0 every target, later layers all but
    wv and w3 (not adapted: no stacks); slot 2 lacks wk (zeros). Returns the stacks, per
    layer {target: (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    dtype, R = model.output.weight.dtype, max(RANKS)
    stacks = []
    for i, layer in enumerate(model.layers):
        owners = {"wq": layer.attention, "wk": layer.attention, "wv": layer.attention, "wo": layer.attention,
                  "w1": layer.feed_forward, "w3": layer.feed_forward, "w2": layer.feed_forward}
        per_layer = {}
        for target, owner in owners.items():
            if i > 0 and target in ("wv", "w3"):
                continue
            base = getattr(owner, target)
            out, n = base.weight.shape
            a, b = torch.zeros(slots, R, n), torch.zeros(slots, out, R)
            for s in range(slots):
                if s == 2 and target == "wk":
                    continue
                a[s, : RANKS[s]] = 0.3 * torch.randn(RANKS[s], n, generator=g)
                b[s, :, : RANKS[s]] = 0.2 * torch.randn(out, RANKS[s], generator=g)
            a, b = a.to(dtype), b.to(dtype)
            setattr(owner, target, SlotLoRA(base, a, b))
            per_layer[target] = (a, b)
        stacks.append(per_layer)
    return stacks


LORA_CASES = {  # lens, slots
    "one row": ([7], [1]),
    "ten rows": ([4, 0, 7, 37, 12, 3, 20, 9, 1, 30], [2, -1, 0, 0, 1, -1, 2, 0, 1, 0]),  # tiles of 4, 4, 2
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_float32_step_with_lora_rows_equals_the_torch_path(odd_folder, case):
    lens, slots = LORA_CASES[case]
    model = LLM(odd_folder, device="cpu", dtype="float32").model
    plain, _, _, _ = one_step(model, lens)
    plain = plain.clone()
    add_lora(model)
    assert cpu_kernels.unsupported(model, torch.float32) is None  # the wrappers' stacks are taken
    got, expected, ours, ref = one_step(model, lens, slots=slots)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.k, ref.k, rtol=1e-5, atol=1e-5)  # k's delta, then rotary
    torch.testing.assert_close(ours.v, ref.v, rtol=1e-5, atol=1e-5)
    for row, s in enumerate(slots):  # the adapters matter: rows with a slot move, the others do not
        if s >= 0:
            assert (got[row] - plain[row]).abs().max() > 0.1 * plain[row].abs().max()
        else:
            torch.testing.assert_close(got[row], plain[row], rtol=1e-4, atol=1e-4)


def test_stacks_given_explicitly_equal_the_wrappers(odd_folder):
    lens, slots = LORA_CASES["ten rows"]
    model = LLM(odd_folder, device="cpu", dtype="float32").model
    stacks = add_lora(model)
    wrapped, _, _, _ = one_step(model, lens, slots=slots)
    wrapped = wrapped.clone()
    plain = LLM(odd_folder, device="cpu", dtype="float32").model
    got, _, _, _ = one_step(plain, lens, slots=slots, lora=stacks)
    torch.testing.assert_close(got, wrapped, rtol=1e-5, atol=1e-5)


def test_a_step_without_slots_is_the_base_model(odd_folder):
    lens = [4, 0, 7, 37, 12]
    model = LLM(odd_folder, device="cpu", dtype="float32").model
    plain, _, _, _ = one_step(model, lens)
    plain = plain.clone()
    add_lora(model)
    got, expected, _, _ = one_step(model, lens)  # slots None: every row -1
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bad_slots_and_stacks_are_refused(odd_folder):
    model = LLM(odd_folder, device="cpu", dtype="float32").model
    add_lora(model)
    cache = PagedKVCache(model.args, 4, BLOCK, torch.float32, torch.device("cpu"))
    decoder = cpu_kernels.CpuDecoder(cpu_kernels.load(), model, cache.k, cache.v)
    assert decoder.slots == 3
    with pytest.raises(RuntimeError, match="adapter slot 3 out of range"):
        decoder([5], [([0], 0, 1)], [3])
    with pytest.raises(RuntimeError, match="one slot per token"):
        decoder([5, 6], [([0], 0, 1), ([1], 0, 1)], [0])
    plain = cpu_kernels.CpuDecoder(cpu_kernels.load(), LLM(odd_folder, device="cpu", dtype="float32").model,
                                   cache.k, cache.v)
    with pytest.raises(RuntimeError, match=r"adapter slot 0 out of range \(0 slots\)"):
        plain([5], [([0], 0, 1)], [0])
    model.layers[0].attention.wq.lora_A = model.layers[0].attention.wq.lora_A[:, :, :10].contiguous()
    assert "adapter stacks of shapes" in cpu_kernels.unsupported(model, torch.float32)


def test_bfloat16_step_with_lora_rows_is_close_to_the_torch_path(odd_folder):
    lens, slots = LORA_CASES["ten rows"]
    model = LLM(odd_folder, device="cpu", dtype="bfloat16").model
    add_lora(model)
    got, expected, ours, ref = one_step(model, lens, seed=2, slots=slots)
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.05 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 2 / 3
    for a, b in ((ours.k, ref.k), (ours.v, ref.v)):
        assert (a.float() - b.float()).abs().max() < 0.03 * b.float().abs().max()


def test_generation_equals_the_torch_path(odd_folder):
    fast = LLM(odd_folder, device="cpu", block_size=BLOCK)
    eager = LLM(odd_folder, device="cpu", block_size=BLOCK, enforce_eager=True)
    assert fast.engine.runner.cpu_decoder is not None and eager.engine.runner.cpu_decoder is None
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 32768, (n,), generator=g).tolist() for n in (5, 23, 11)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    a, b = fast.generate(prompts, params), eager.generate(prompts, params)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        torch.testing.assert_close(torch.tensor(x.outputs[0].logprobs), torch.tensor(y.outputs[0].logprobs),
                                   rtol=1e-4, atol=1e-4)


def test_without_the_kernel_generation_still_works(odd_folder, monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("error: no C++ compiler found")

    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setattr(cpu_kernels, "_build", no_compiler)
    with caplog.at_level(logging.WARNING, logger="galerne"):
        llm = LLM(odd_folder, device="cpu", block_size=BLOCK)
    assert llm.engine.runner.cpu_decoder is None
    assert "CPU decode kernel unavailable (error: no C++ compiler found)" in caplog.text
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = LLM(odd_folder, device="cpu", block_size=BLOCK, enforce_eager=True).generate([[5, 6, 7]], params)
    assert llm.generate([[5, 6, 7]], params)[0].token_ids == expected[0].token_ids


def test_turned_off_by_the_environment(odd_folder, monkeypatch):
    monkeypatch.setenv("GALERNE_CPU_KERNELS", "0")
    assert LLM(odd_folder, device="cpu").engine.runner.cpu_decoder is None


def test_models_it_cannot_run_use_the_torch_path(tiny_factory):
    folder, _ = tiny_factory("mixtral")
    llm = LLM(folder, device="cpu")
    assert cpu_kernels.unsupported(llm.model, torch.float32) == "mixture-of-experts layers"
    assert llm.engine.runner.cpu_decoder is None


# ------------------------------------------------------------------ building: cache key, lock


def test_the_cache_key_covers_what_the_binary_depends_on(monkeypatch):
    sig = cpu_kernels.signature()
    assert torch.__version__ in sig["torch"] and torch.version.git_version in sig["torch"]
    assert sig["torch_path"] == os.path.realpath(os.path.dirname(torch.__file__))
    assert sig["python"].endswith(sysconfig.get_config_var("EXT_SUFFIX"))
    assert sig["compiler"].startswith(os.path.realpath(shutil.which(os.environ.get("CXX", "c++"))) + " (")
    assert "-march=native" in sig["flags"] and sig["cpu"].startswith(platform.machine())
    here = cpu_kernels.kernel_folder()
    assert cpu_kernels.load() is not None and cpu_kernels.kernel_folder() == here  # a build changes nothing of it
    assert json.loads((here / "signature.json").read_text()) == sig  # what the folder's binary was built from
    assert cpu_kernels.kernel_folder("x86-64-v3") != here
    with monkeypatch.context() as m:  # another environment's torch (a second venv): its own folder
        m.setattr(torch, "__file__", "/elsewhere/venv/lib/python3.11/site-packages/torch/__init__.py")
        assert cpu_kernels.kernel_folder() != here
    with monkeypatch.context() as m:
        m.setattr(torch.version, "git_version", "0" * 40)  # another build of the same torch version
        assert cpu_kernels.kernel_folder() != here
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "_compiler", lambda: ("/usr/bin/clang++", "clang version 17"))
        assert cpu_kernels.kernel_folder() != here
    assert cpu_kernels.kernel_folder() == here


def _python(code: str, **kw) -> subprocess.Popen:
    # Ctrl-C as a terminal gives it, even where the tests run with SIGINT ignored (a
    # background job of a non-interactive shell, nohup): a child inherits that.
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def _hold_build_lock(folder):
    """Another process that holds the build lock of ``folder`` (as a build in progress does)."""
    holder = _python("import time\nfrom filelock import FileLock\n"
                     f"lock = FileLock({str(folder / 'build.lock')!r})\nlock.acquire()\nprint('held', flush=True)\n"
                     "time.sleep(600)")
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_lock_left_by_a_build_killed_halfway_does_not_stop_the_next():
    folder = cpu_kernels.kernel_folder()
    baton = folder / "lock"  # torch's own lock file, which a killed build leaves and later ones waited on forever
    baton.touch()
    try:
        proc = _python("import logging; logging.basicConfig()\nfrom galerne.kernels import cpu\n"
                       "assert cpu.load() is not None")
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert not baton.exists()
    finally:
        baton.unlink(missing_ok=True)


def test_waiting_for_another_build_is_said_and_time_limited(monkeypatch, caplog):
    folder = cpu_kernels.kernel_folder()
    holder = _hold_build_lock(folder)
    try:
        monkeypatch.setattr(cpu_kernels, "_built", {})
        monkeypatch.setattr(cpu_kernels, "BUILD_WAIT_S", 1.0)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="galerne"):
            assert cpu_kernels.load() is None  # the wait ran out: decode with torch ops
        assert time.monotonic() - start < 10
        assert f"waiting for another build of galerne's CPU decode kernel in {folder} (up to 1 s; Ctrl-C stops)" in caplog.text
        assert (f"CPU decode kernel unavailable (another process has been building it for more than 1 s (it holds "
                f"{folder / 'build.lock'})); decoding with torch ops") in caplog.text
    finally:
        holder.kill()  # a build killed: its lock goes with it
        holder.wait()
    monkeypatch.setattr(cpu_kernels, "_built", {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="galerne"):
        assert cpu_kernels.load() is not None
    assert caplog.text == ""  # neither waiting nor compiling: found in the cache


def test_ctrl_c_stops_the_wait():
    holder = _hold_build_lock(cpu_kernels.kernel_folder())
    proc = _python("from galerne.cli import main\nraise SystemExit(main(['generate', '--prompt', 'Hi', '--max-tokens', '1']))")
    try:
        said = []
        deadline = time.monotonic() + 120
        while not any("waiting for another build" in line for line in said):
            assert proc.poll() is None and time.monotonic() < deadline, said
            said.append(proc.stderr.readline())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        holder.kill()
        holder.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err


@pytest.mark.slow  # two builds of the kernel, one of them killed (about 40 s)
def test_a_build_killed_while_compiling_leaves_nothing_in_the_way(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = "import logging; logging.basicConfig()\nfrom galerne.kernels import cpu\nassert cpu.load() is not None"
    first = _python(code, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("galerne/kernels/*/build.ninja")):  # torch's build has started
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        time.sleep(2)  # the compiler is running
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # Python, ninja and the compiler, as a kill -9 of the group would
        first.wait()
    assert list(tmp_path.glob("galerne/kernels/*/lock"))  # what torch's build leaves behind
    second = _python(code, env=env)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert "compiling galerne's CPU decode kernel for this CPU (once, about 30 s)" in err
