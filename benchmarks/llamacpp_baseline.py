"""llama.cpp CPU decode baseline (llama-cpp-python 0.3.36, built from sdist with AMX off).

Functions
---------
convert_hf_to_gguf(hf_dir, out_path, precision)      precision in f32 | bf16 | q8_0 | q4_0 | q4_k
decode_tokens_per_s(gguf_path, prompt_ids, new_tokens, threads=2) -> float
logits_parity(hf_dir, gguf_path, prompt_ids) -> dict   (llama.cpp vs transformers, f32)

`python llamacpp_baseline.py` builds (if missing) the random-weight Mistral `cpu-125m` HF folder
under .bench/llamacpp/cpu-125m-hf, converts it to the four GGUF precisions, checks f32 logits
parity against transformers and prints the decode tokens/s (batch 1, 128-token random prompt,
256 new tokens, greedy, EOS masked, n_threads=2, n_ctx=512, logits_all=False).

Everything runs offline:
  * the converter is llama.cpp's convert_hf_to_gguf.py + conversion/ + gguf-py/ copied from the
    llama-cpp-python sdist (vendor/llama.cpp) into ./converter (re-extracted from
    ./sdist/llama_cpp_python-*.tar.gz if missing). It MUST use its own vendored gguf-py: the PyPI
    gguf 0.19.0 is older than this converter (AttributeError: gguf.LazyChunkedTensor).
  * the tokenizer comes from the HF folder (tokenizer.model preferred, tokenizer.json accepted).
    If the folder has neither and vocab_size == 32768, the sentencepiece v3 model shipped in
    mistral_common/data is staged as tokenizer.model.
  * q8_0 / q4_0 are produced from the f32 GGUF with llama_cpp.llama_model_quantize (the wheel has
    no llama-quantize binary); defaults as llama-quantize (Q4_0 keeps output.weight at Q6_K).
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

# Everything llama.cpp-related lives in the ignored benchmark cache, never in the repository.
HERE = Path(os.environ.get("GALERNE_BENCH_CACHE", Path(__file__).resolve().parent.parent / ".bench")) / "llamacpp"
CONVERTER_DIR = HERE / "converter"
SDIST_GLOB = str(HERE / "sdist" / "llama_cpp_python-*.tar.gz")
PRECISIONS = ("f32", "bf16", "q8_0", "q4_0", "q4_k")
SPM_V3 = "mistral_instruct_tokenizer_240323.model.v3"  # vocab 32768


# --------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------
def _ensure_converter() -> Path:
    script = CONVERTER_DIR / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdists = sorted(glob.glob(SDIST_GLOB))
    if not sdists:
        raise FileNotFoundError(
            f"{script} missing and no sdist at {SDIST_GLOB}; run "
            f"`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d {HERE / 'sdist'}`")
    with tarfile.open(sdists[-1]) as tf:
        root = tf.getnames()[0].split("/")[0]
        pre = f"{root}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
        members = [m for m in tf.getmembers()
                   if m.name.startswith(pre) and m.name[len(pre):].startswith(wanted)]
        for m in members:
            m.name = m.name[len(pre):]
        CONVERTER_DIR.mkdir(parents=True, exist_ok=True)
        tf.extractall(CONVERTER_DIR, members=members)
    return script


def _stage_tokenizer(hf_dir: Path, tmp: Path) -> Path:
    """Return a folder the converter can read. If hf_dir has no tokenizer, make a linked copy
    with mistral_common's sentencepiece v3 model as tokenizer.model (vocab must be 32768)."""
    if (hf_dir / "tokenizer.model").is_file() or (hf_dir / "tokenizer.json").is_file():
        return hf_dir
    import json
    vocab = json.loads((hf_dir / "config.json").read_text()).get("vocab_size")
    if vocab != 32768:
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.model/tokenizer.json and vocab_size={vocab} "
                                "does not match the bundled 32768-token sentencepiece model")
    import mistral_common
    spm = Path(os.path.dirname(mistral_common.__file__)) / "data" / SPM_V3
    staged = tmp / "hf"
    staged.mkdir()
    for f in hf_dir.iterdir():
        (staged / f.name).symlink_to(f.resolve())
    shutil.copy(spm, staged / "tokenizer.model")
    return staged


def _run_converter(hf_dir: Path, out_path: Path, outtype: str) -> None:
    script = _ensure_converter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)  # must use the vendored gguf-py
    cmd = [sys.executable, str(script), str(hf_dir), "--outtype", outtype, "--outfile", str(out_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"convert_hf_to_gguf failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def quantize_gguf(in_path, out_path, precision: str, nthread: int = 2, verbose: bool = False) -> None:
    import llama_cpp
    # q4_k: llama-quantize's Q4_K_S (Q4_K almost everywhere, a few ffn_down / attn_v at Q5_K, output Q6_K).
    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
             "q4_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
             "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, "f32": llama_cpp.LLAMA_FTYPE_ALL_F32}[precision]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    from llama_cpp._utils import suppress_stdout_stderr
    with suppress_stdout_stderr(disable=verbose):   # llama_model_quantize logs every tensor to stderr
        rc = llama_cpp.llama_model_quantize(str(in_path).encode(), str(out_path).encode(), ctypes.byref(params))
    if rc != 0 or not Path(out_path).is_file():
        raise RuntimeError(f"llama_model_quantize({precision}) failed with rc={rc}")


def convert_hf_to_gguf(hf_dir, out_path, precision: str) -> Path:
    """Convert a HF Mistral/Llama folder (config.json + *.safetensors + tokenizer) to GGUF.

    f32/bf16: llama.cpp convert_hf_to_gguf.py --outtype f32|bf16.
    q8_0/q4_0/q4_k: convert to f32 first, then llama_model_quantize (same as `llama-quantize f32.gguf out
    Q8_0|Q4_0|Q4_K_S`).
    """
    precision = precision.lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    hf_dir, out_path = Path(hf_dir).resolve(), Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".gguf-tmp-") as td:
        td = Path(td)
        src = _stage_tokenizer(hf_dir, td)
        if precision in ("f32", "bf16"):
            tmp_out = td / "out.gguf"
            _run_converter(src, tmp_out, precision)
        else:
            f32 = td / "f32.gguf"
            _run_converter(src, f32, "f32")
            tmp_out = td / "out.gguf"
            quantize_gguf(f32, tmp_out, precision)
        shutil.move(str(tmp_out), str(out_path))
    return out_path


# --------------------------------------------------------------------------------------------
# decode benchmark
# --------------------------------------------------------------------------------------------
def _load(gguf_path, threads: int, logits_all: bool = False, n_ctx: int = 512, use_mmap: bool = True):
    from llama_cpp import Llama
    return Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                 n_batch=512, logits_all=logits_all, use_mmap=use_mmap, verbose=False, seed=0)


def _sys_busy_s() -> float:
    """Seconds of non-idle CPU time summed over all CPUs (from /proc/stat)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    steal = f[7] if len(f) > 7 else 0
    return (sum(f[:8]) - idle - steal) / hz


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _majflt() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def wait_for_idle(max_busy: float = 0.10, window_s: float = 1.0, timeout_s: float = 300.0) -> float:
    """Block until other processes use < max_busy of the machine over `window_s` (or timeout).
    The benchmark box is shared (2 vCPUs); a concurrent job halves or worse the decode rate."""
    ncpu = os.cpu_count() or 1
    t_end = time.monotonic() + timeout_s
    while True:
        b0, s0, w0 = _sys_busy_s(), _self_cpu_s(), time.monotonic()
        time.sleep(window_s)
        other = ((_sys_busy_s() - b0) - (_self_cpu_s() - s0)) / ((time.monotonic() - w0) * ncpu)
        if other < max_busy or time.monotonic() > t_end:
            return other


def lock_memory() -> bool:
    """mlockall(MCL_CURRENT): pin everything mapped now (model weights, libllama/libggml code, Python).
    This VM runs a DAMON 'pageout' scheme that evicts file-backed pages, incl. hot library code and
    mmap'd weights; the refaults show up as multi-second stalls. Returns False if not permitted."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.mlockall(1) == 0  # MCL_CURRENT
    except OSError:
        return False


def _greedy_decode(llm, prompt_ids, new_tokens: int, eos_id: int | None) -> dict:
    """Prompt prefill (timed separately, excluded from the rate) then `new_tokens` timed steps of:
    greedy argmax over the last logits with EOS masked to -inf, then llama_decode of that single
    token (KV cache grows). Also records other processes' CPU share and this process's major page
    faults during the decode window."""
    import llama_cpp
    n_vocab = llm.n_vocab()
    ncpu = os.cpu_count() or 1
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(list(prompt_ids))                      # prompt processing: excluded
    t1 = time.perf_counter()
    ctx = llm.ctx
    out = []
    b0, s0, f0 = _sys_busy_s(), _self_cpu_s(), _majflt()
    t2 = time.perf_counter()
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        if eos_id is not None and eos_id >= 0:
            logits[eos_id] = -np.inf                # ignore EOS (= llama.cpp --ignore-eos)
        tok = int(logits.argmax())
        out.append(tok)
        llm.eval([tok])
    dt = time.perf_counter() - t2
    other = ((_sys_busy_s() - b0) - (_self_cpu_s() - s0)) / (max(dt, 1e-9) * ncpu)
    return dict(tok_s=new_tokens / dt, decode_s=dt, prompt_s=t1 - t0, other_load=other,
                majflt=_majflt() - f0, tokens=out)


def _is_clean(run: dict, max_other_load) -> bool:
    return max_other_load is None or (run["other_load"] <= max_other_load and run["majflt"] == 0)


def decode_benchmark_many(paths: dict, prompt_ids, new_tokens: int, threads: int = 2, repeats: int = 5,
                          max_other_load: float | None = 0.05, max_attempts: int | None = None,
                          mlock: bool = True, warmup: bool = True, time_budget_s: float | None = None,
                          progress: bool = False) -> dict:
    """Benchmark several GGUFs in interleaved rounds (A B C D, A B C D, ...) so slow/fast periods of
    the shared host hit every precision alike. Per model: median over `repeats` clean runs.

    A run is clean when other processes used <= max_other_load of all CPUs during the decode window
    (/proc/stat minus this process's CPU time) and this process took no major page faults. Before each
    run we wait for the machine to go idle (at most 300 s per wait). max_other_load=None disables all
    of this. time_budget_s bounds the whole loop; models without enough clean runs get clean=False."""
    if len(prompt_ids) + new_tokens > 512:
        raise ValueError("prompt + new tokens exceed n_ctx=512")
    max_attempts = max_attempts or 4 * repeats
    llms = {k: _load(p, threads) for k, p in paths.items()}
    locked = lock_memory() if mlock else False
    eos = {k: llm.token_eos() for k, llm in llms.items()}
    if warmup:
        for k, llm in llms.items():
            _greedy_decode(llm, prompt_ids, min(16, new_tokens), eos[k])
    runs = {k: [] for k in llms}
    rejected = {k: [] for k in llms}
    t_end = time.monotonic() + time_budget_s if time_budget_s else float("inf")
    for _ in range(max_attempts):
        todo = [k for k in llms if len(runs[k]) < repeats]
        if not todo or time.monotonic() > t_end:
            break
        for k in todo:
            if max_other_load is not None:
                wait_for_idle(timeout_s=max(1.0, min(300.0, t_end - time.monotonic())))
            r = _greedy_decode(llms[k], prompt_ids, new_tokens, eos[k])
            ok = _is_clean(r, max_other_load)
            (runs if ok else rejected)[k].append(r)
            if progress:
                print(f"    {k:5s} {r['tok_s']:7.1f} tok/s  other-load {r['other_load']:.1%}  majflt {r['majflt']}"
                      f"  {'ok' if ok else 'REJECTED'}", flush=True)
    for llm in llms.values():
        llm.close()
    res = {}
    for k in llms:
        clean = len(runs[k]) >= repeats
        use = runs[k] or rejected[k]  # never quiet: report contaminated runs, flagged clean=False
        rates = [r["tok_s"] for r in use]
        res[k] = dict(tok_s=float(np.median(rates)), all_tok_s=rates, runs=use, n_rejected=len(rejected[k]),
                      rejected_tok_s=[r["tok_s"] for r in rejected[k]], clean=clean, mlocked=locked,
                      prompt_s=float(np.median([r["prompt_s"] for r in use])),
                      eos_id=eos[k], eos_generated=any(eos[k] in r["tokens"] for r in use))
    return res


def decoder(gguf_path, prompt_ids, new_tokens: int, threads: int = 2):
    """(run, close) for one loaded GGUF: run() decodes once as decode_benchmark_many
    does and returns its decode-phase tokens/s, so that a caller can interleave it
    with other engines' runs."""
    llm = _load(gguf_path, threads)
    eos = llm.token_eos()
    return (lambda: _greedy_decode(llm, prompt_ids, new_tokens, eos)["tok_s"]), llm.close


def decode_benchmark(gguf_path, prompt_ids, new_tokens: int, threads: int = 2, repeats: int = 5,
                     **kw) -> dict:
    """Single-model version of decode_benchmark_many."""
    return decode_benchmark_many({"m": gguf_path}, prompt_ids, new_tokens, threads=threads,
                                 repeats=repeats, **kw)["m"]


def decode_tokens_per_s(gguf_path, prompt_ids, new_tokens, threads=2) -> float:
    """Decode-phase tokens/s (prompt processing excluded), batch 1, greedy, EOS ignored,
    n_ctx=512, logits_all=False. Median of 5 clean timed runs after a short warm-up.
    Note: lock_memory() (mlockall) is applied to the calling process."""
    return decode_benchmark(gguf_path, prompt_ids, new_tokens, threads=threads)["tok_s"]


# --------------------------------------------------------------------------------------------
# logits parity
# --------------------------------------------------------------------------------------------
def logits_parity(hf_dir, gguf_path, prompt_ids, threads: int = 2) -> dict:
    """Compare llama.cpp logits (all prompt positions) with transformers' float32 logits."""
    import torch
    from transformers import AutoModelForCausalLM
    llm = _load(gguf_path, threads, logits_all=True)
    llm.reset()
    llm.eval(list(prompt_ids))
    lc = np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)
    llm.close()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.tensor([list(prompt_ids)])).logits[0].float().numpy()
    diff = np.abs(lc - hf)
    return dict(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                hf_max_abs_logit=float(np.abs(hf).max()),
                argmax_agreement=float((lc.argmax(-1) == hf.argmax(-1)).mean()))


# --------------------------------------------------------------------------------------------
# main: cpu-125m measurement
# --------------------------------------------------------------------------------------------
CPU_125M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                head_dim=64, intermediate_size=2048, vocab_size=32768)
REFERENCE_TOK_S = {"f32": 56, "bf16": 85, "q8_0": 114, "q4_0": 185}


def make_hf_mistral(out_dir, seed: int = 0, **cfg_kwargs) -> Path:
    """Random-weight MistralForCausalLM saved with save_pretrained, plus an offline tokenizer
    (mistral_common's sentencepiece v3 as tokenizer.model, and the transformers tokenizer.json)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, LlamaTokenizer
    import mistral_common
    out = Path(out_dir)
    torch.manual_seed(seed)
    cfg = MistralConfig(max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, sliding_window=None, bos_token_id=1, eos_token_id=2,
                        **cfg_kwargs)
    model = MistralForCausalLM(cfg).eval().to(torch.float32)
    model.save_pretrained(str(out))
    spm = Path(os.path.dirname(mistral_common.__file__)) / "data" / SPM_V3
    with tempfile.TemporaryDirectory() as td:
        shutil.copy(spm, Path(td) / "tokenizer.model")
        LlamaTokenizer.from_pretrained(td).save_pretrained(str(out))  # tokenizer.json (offline conversion)
    shutil.copy(spm, out / "tokenizer.model")
    return out


def main(argv=None) -> None:
    import argparse
    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", default=str(HERE / "cpu-125m-hf"))
    ap.add_argument("--gguf-dir", default=str(HERE / "gguf"))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-mlock", action="store_true")
    ap.add_argument("--time-budget", type=float, default=2400.0, help="seconds for the decode loop")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--reconvert", action="store_true")
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args(argv)

    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "config.json").is_file():
        print(f"creating random cpu-125m (seed 0) at {hf_dir}")
        make_hf_mistral(hf_dir, seed=0, **CPU_125M)
    gdir = Path(args.gguf_dir)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 32768, (args.prompt_len,), generator=g).tolist()

    paths = {}
    for p in args.precisions.split(","):
        path = gdir / f"cpu-125m-{p}.gguf"
        if args.reconvert or not path.is_file():
            t = time.perf_counter()
            convert_hf_to_gguf(hf_dir, path, p)
            print(f"converted {p}: {path} ({path.stat().st_size/2**20:.1f} MiB, {time.perf_counter()-t:.1f}s)")
        paths[p] = path

    print(f"\ndecode: batch 1, prompt {args.prompt_len} random ids (torch seed 0), {args.new_tokens} new tokens, "
          f"greedy, EOS masked, n_threads={args.threads}, n_ctx=512, logits_all=False; interleaved rounds, "
          f"median of {args.repeats} clean runs", flush=True)
    res = decode_benchmark_many(paths, prompt, args.new_tokens, threads=args.threads, repeats=args.repeats,
                                mlock=not args.no_mlock, time_budget_s=args.time_budget,
                                progress=not args.quiet)
    for p, r in res.items():
        rates = r["all_tok_s"]
        print(f"  {p:5s} {r['tok_s']:7.1f} tok/s  (min {min(rates):.1f}, max {max(rates):.1f}, n={len(rates)})  "
              f"ref~{REFERENCE_TOK_S.get(p)}  prompt {r['prompt_s']*1e3:.0f} ms  rejected={r['n_rejected']} "
              f"mlock={r['mlocked']}" + ("" if r["clean"] else "  [NOT CLEAN: machine busy]"))
    print("  all runs:", {p: [round(x, 1) for x in r["all_tok_s"]] for p, r in res.items()})

    # parity last: decode timings are taken before torch runs any model in this process
    if "f32" in paths and not args.skip_parity:
        par = logits_parity(hf_dir, paths["f32"], prompt, threads=args.threads)
        print(f"f32 logits parity vs transformers ({args.prompt_len} positions x 32768): "
              f"max_abs_diff={par['max_abs_diff']:.3e} mean_abs_diff={par['mean_abs_diff']:.3e} "
              f"(max |logit|={par['hf_max_abs_logit']:.3f}) argmax agreement={par['argmax_agreement']:.4f}")


if __name__ == "__main__":
    main()
