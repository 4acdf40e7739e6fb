"""GGUF files (galerne/weights/gguf.py): galerne -> GGUF -> galerne round trips, files
written by llama.cpp's own converter, files galerne writes read by llama.cpp, the
embedded tokenizer, and the errors that name what is wrong."""

from __future__ import annotations

import dataclasses
import glob
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_hf, tekken_file

from galerne import LLM, SamplingParams
from galerne.cli import main
from galerne.errors import ConfigError, ModelLoadError, TokenizerError
from galerne.models.quant import QuantEmbedding, QuantLinear
from galerne.quant import SCHEMES, QTensor, quantize
from galerne.tokenizer import Tokenizer
from galerne.tokenizer.gguf import GGUFTokenizer
from galerne.tokenizer.mistral import MistralCommonTokenizer
from galerne.weights.export import convert, quantize_checkpoint
from galerne.weights.gguf import GGUFCheckpoint
from galerne.weights.loader import build_model, load_model

gguf = pytest.importorskip("gguf")

# hidden 256 and intermediate 512: every matrix fits q4_k's 256-weight super-blocks.
WIDE = dict(hidden_size=256, intermediate_size=512)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPT = [1, 23325, 2294, 1032, 781, 29494, 6142, 1757, 29473, 11367, 4000, 77]
SMALL_PROMPT = [1, 172, 622, 211, 385, 370, 643, 1042, 513, 364, 966, 732]  # in a 1100-token vocabulary
TEXTS = ["Hello world", "  two  spaces", " leading", "trailing  ", "héllo 日本語 🙂", "12345 3.14", "a\nb\n\n c",
         "tab\there", "it's I'M 'll", "[INST] hi [/INST]", "<s></s>", "x" * 40]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def alone(path: Path, folder: Path) -> Path:
    """``path`` moved into an empty ``folder``: no tokenizer file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(str(path), folder / path.name))


def small_vocab(folder: Path, kind: str = "mistral", **overrides) -> Path:
    """A tiny model with a 1100-token tekken tokenizer: the quantized tests' embedding and
    output are small (the reference q4_k quantizer is slow on a 32768-row embedding)."""
    build_hf(kind, folder, vocab_size=1100, **overrides)
    (folder / "tokenizer.model.v3").unlink()
    tekken_file(folder, "v7")
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_vocab(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return small_vocab(tmp_path_factory.mktemp("wide"), **WIDE)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("scheme,dtype", [(None, "float32"), ("f16", "float16"), ("bf16", "bfloat16")])
def test_float_round_trip_is_bit_identical(scheme, dtype, tiny_mistral, tmp_path):
    folder, _ = tiny_mistral
    out = convert(folder, tmp_path / "m.gguf", "gguf", scheme=scheme)
    ref, ckpt = load_model(folder, dtype=dtype, device="cpu")
    back, g = load_model(out, dtype=dtype, device="cpu")
    assert g.layout == "gguf" and g.args == ckpt.args  # sliding window, context, eps, theta, ids
    assert_same_weights(ref, back)
    types = {t.name: t.tensor_type.name for t in g.reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay F32, as llama.cpp writes them
    assert types["blk.0.attn_q.weight"] == (scheme or "f32").upper()


@pytest.mark.parametrize("kind", ["tied", "head-dim", "mistral3", "mixtral"])
def test_round_trip_of_other_shapes(kind, tiny_factory, tmp_path):
    """Tied embeddings (no output.weight in the file), a head_dim that is not
    dim / n_heads (attention.key_length), a vision-language checkpoint's language model,
    Mixtral (each layer's experts stacked in three tensors, as llama.cpp has them)."""
    folder, _ = tiny_factory(kind)
    out = convert(folder, tmp_path / "m.gguf", "gguf")
    ref, ckpt = load_model(folder, dtype="float32", device="cpu")
    back, g = load_model(out, dtype="float32", device="cpu")
    assert dataclasses.replace(g.args, vision=None) == dataclasses.replace(ckpt.args, vision=None)
    assert ("output.weight" in {t.name for t in g.reader.tensors}) == (kind != "tied")
    assert_same_weights(ref, back)
    if kind == "mixtral":
        shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in g.reader.tensors}
        assert shapes["blk.1.ffn_down_exps.weight"] == (4, 64, 128) and shapes["blk.1.ffn_gate_inp.weight"] == (4, 64)


def test_mixtral_experts_quantized(tmp_path):
    """A block scheme quantizes Mixtral's experts (as llama.cpp does; the router stays
    F32); they load as QuantLinear experts, the blocks those of each expert's weight."""
    folder = small_vocab(tmp_path / "mixtral", "mixtral")
    out = convert(folder, tmp_path / "m.gguf", "gguf", scheme="q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFCheckpoint.open(out).reader.tensors}
    assert types["blk.0.ffn_up_exps.weight"] == "Q8_0" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    ref, _ = load_model(folder, dtype="float32", device="cpu")
    back, _ = load_model(out, dtype="float32", device="cpu")
    for e in range(4):
        q = back.layers[1].feed_forward.experts[e].w2
        assert isinstance(q, QuantLinear)
        assert torch.equal(q.qweight, quantize(ref.layers[1].feed_forward.experts[e].w2.weight, "q8_0"))
    # The QuantLinear experts compute what their dequantized weights do (the router's
    # choices are those of the quantized model: compared with the float one, a few flip).
    g = GGUFCheckpoint.open(out)
    dense = build_model(g.args, ((p, n, native, t.dense() if isinstance(t, QTensor) else t)
                                 for p, n, native, t in g.native_tensors()),
                        dtype="float32", device="cpu", config_name="gguf", where=str(out), desc="", progress=False)
    tok = Tokenizer.from_path(folder)
    torch.testing.assert_close(LLM.from_model(back, tok).score(SMALL_PROMPT),
                               LLM.from_model(dense, tok).score(SMALL_PROMPT), atol=1e-4, rtol=1e-4)


def test_yarn_and_query_scaling_round_trip(tiny_factory, tmp_path):
    """Ministral 3 (YaRN, llama-4 query scaling) is written as arch mistral3 with the
    metadata llama.cpp reads, and reads back to the same model."""
    folder, _ = tiny_factory("ministral3")
    out = convert(folder, tmp_path / "m.gguf", "gguf")
    ref, ckpt = load_model(folder, dtype="float32", device="cpu")
    back, g = load_model(out, dtype="float32", device="cpu")
    assert g.arch == "mistral3"
    a, b = ckpt.args, g.args
    assert b.query_scaling == a.query_scaling and b.yarn.magnitude == pytest.approx(a.yarn.magnitude)
    assert (b.yarn.factor, b.yarn.original_max_position_embeddings, b.yarn.beta_fast, b.yarn.beta_slow) == \
        (a.yarn.factor, a.yarn.original_max_position_embeddings, a.yarn.beta_fast, a.yarn.beta_slow)
    assert_same_weights(ref, back)
    ids = (PROMPT * 4)[:40]
    tok = Tokenizer.from_path(folder)
    torch.testing.assert_close(LLM.from_model(back, tok).score(ids), LLM.from_model(ref, tok).score(ids))


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_quantized_round_trip_keeps_the_blocks(name, small, tmp_path):
    """A GGUF written with a block scheme loads as the model quantized at load does:
    the same blocks, kept quantized (QuantLinear / QuantEmbedding)."""
    folder = small
    out = convert(folder, tmp_path / "m.gguf", "gguf", scheme=name)
    ref, _ = load_model(folder, dtype="float32", device="cpu", quantization=name)
    back, _ = load_model(out, dtype="float32", device="cpu")
    assert isinstance(back.layers[0].attention.wq, QuantLinear) and isinstance(back.tok_embeddings, QuantEmbedding)
    assert_same_weights(ref, back)
    types = {t.name: t.tensor_type.name for t in GGUFCheckpoint.open(out).reader.tensors}
    # A 4-bit scheme keeps the output projection at 8 bits (quant.plan.tensor_scheme).
    assert types["output.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == name.upper()
    # A quantized file loads as stored, as a `galerne quantize` folder does.
    assert_same_weights(back, load_model(out, dtype="float32", device="cpu", quantization=name)[0])
    with pytest.raises(ModelLoadError, match=f"already quantized \\({name}\\)"):
        load_model(out, device="cpu", quantization="q4_k")


def test_q4_k_round_trip_keeps_the_blocks(wide, tmp_path):
    out = convert(wide, tmp_path / "m.gguf", "gguf", scheme="q4_k")
    ref, _ = load_model(wide, dtype="float32", device="cpu", quantization="q4_k")
    back, _ = load_model(out, dtype="float32", device="cpu")
    assert_same_weights(ref, back)
    assert back.layers[1].feed_forward.w2.scheme.name == "q4_k"


def test_a_quantized_source_is_written_as_it_is(small, tmp_path):
    """A `galerne quantize` folder and a GGUF file: their blocks go to the GGUF unchanged;
    asking for another scheme is refused before anything is written."""
    folder = small
    q = quantize_checkpoint(folder, tmp_path / "q", "q4_0")
    out = convert(q, tmp_path / "q.gguf", "gguf")
    assert_same_weights(load_model(q, dtype="float32", device="cpu")[0], load_model(out, dtype="float32", device="cpu")[0])
    again = convert(out, tmp_path / "again.gguf", "gguf")
    a, b = GGUFCheckpoint.open(out).reader.tensors, GGUFCheckpoint.open(again).reader.tensors
    assert [(t.name, t.tensor_type) for t in a] == [(t.name, t.tensor_type) for t in b]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a, b, strict=True))
    assert GGUFCheckpoint.open(again).metadata["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>", "[INST]"]
    with pytest.raises(ModelLoadError, match="stored in q4_0"):
        convert(q, tmp_path / "q8.gguf", "gguf", scheme="q8_0")
    assert not (tmp_path / "q8.gguf").exists()


def _rewrite(src: Path, dst: Path, replace: dict[str, tuple[np.ndarray, object]]) -> Path:
    """A copy of GGUF ``src`` with some tensors replaced by (data, GGML type)."""
    from gguf import GGUFWriter

    r = GGUFCheckpoint.open(src).reader
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        data, raw = replace.get(t.name, (np.array(t.data), None))
        w.add_tensor(t.name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _k_blocks(rows: int, cols: int, name: str) -> np.ndarray:
    """Random Q5_K / Q6_K blocks with small, finite float16 scales."""
    s = SCHEMES[name]
    b = np.random.default_rng(0).integers(0, 256, (rows, cols // 256, s.block_bytes), dtype=np.uint8)
    if name == "q6_k":  # ql, qh, int8 scales, then d
        b[..., 208:210] = np.array([0.01], np.float16).view(np.uint8)
    else:  # d, dmin, then scales and quants
        b[..., 0:4] = np.array([0.01, 0.005], np.float16).view(np.uint8)
    return b.reshape(rows, -1)


def test_q5_k_and_q6_k_are_stored_as_q8_0(wide, tmp_path, caplog):
    """Tensors in schemes no kernel reads (Q4_K_M / Q5_K_M files have some) become q8_0
    at load (memory near the file's size), within q8_0's rounding of their values; a
    GGUF written from the file keeps them as they are."""
    from gguf import GGMLQuantizationType

    from galerne.quant import dequantize

    f32 = convert(wide, tmp_path / "f32.gguf", "gguf")
    v, down = _k_blocks(128, 256, "q6_k"), _k_blocks(256, 512, "q5_k")
    path = _rewrite(f32, tmp_path / "k.gguf", {"blk.0.attn_v.weight": (v, GGMLQuantizationType.Q6_K),
                                               "blk.1.ffn_down.weight": (down, GGMLQuantizationType.Q5_K)})
    with caplog.at_level("INFO", logger="galerne.weights.gguf"):
        model, _ = load_model(path, dtype="float32", device="cpu")
    assert "2 tensor(s) in Q5_K/Q6_K" in caplog.text
    for module, blocks, name in ((model.layers[0].attention.wv, v, "q6_k"), (model.layers[1].feed_forward.w2, down, "q5_k")):
        assert isinstance(module, QuantLinear) and module.scheme.name == "q8_0"
        exact = dequantize(torch.from_numpy(blocks), SCHEMES[name], module.in_features)
        got = dequantize(module.qweight, SCHEMES["q8_0"], module.in_features)
        assert (got - exact).abs().max() <= exact.abs().max() / 127
    again = GGUFCheckpoint.open(convert(path, tmp_path / "again.gguf", "gguf"))
    kept = {t.name: t for t in again.reader.tensors}
    assert kept["blk.0.attn_v.weight"].tensor_type.name == "Q6_K" and np.array_equal(kept["blk.0.attn_v.weight"].data, v)


def test_refuses_to_overwrite(tiny_mistral, tmp_path, capsys):
    folder, _ = tiny_mistral
    dst = tmp_path / "m.gguf"
    dst.write_bytes(b"user data")
    assert main(["convert", str(folder), str(dst), "--to", "gguf"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert dst.read_bytes() == b"user data"
    assert list(tmp_path.iterdir()) == [dst]  # no partial file left


def test_cli_convert_to_gguf(small, tmp_path, capsys):
    folder = small
    assert main(["convert", str(folder), str(tmp_path / "m.gguf"), "--to", "gguf", "--scheme", "q8_0"]) == 0
    assert "wrote gguf" in capsys.readouterr().out
    assert main(["convert", str(folder), str(tmp_path / "x.gguf"), "--to", "gguf", "--dtype", "float16"]) == 1
    assert "scheme" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--to", "hf"]) == 1
    assert "converts to GGUF only" in capsys.readouterr().err and not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ tokenizer, LLM


def test_embedded_sentencepiece_tokenizer_encodes_as_mistral_common(tiny_mistral, tmp_path):
    folder, _ = tiny_mistral
    out = alone(convert(folder, tmp_path / "m.gguf", "gguf"), tmp_path / "alone")
    tok, ref = Tokenizer.from_path(out), Tokenizer.from_path(folder)
    assert isinstance(tok, GGUFTokenizer) and isinstance(ref, MistralCommonTokenizer)
    _same_tokenizer(tok, ref)


def test_embedded_tekken_tokenizer_encodes_as_mistral_common(small, tmp_path):
    folder = small
    out = alone(convert(folder, tmp_path / "t.gguf", "gguf"), tmp_path / "alone")
    meta = GGUFCheckpoint.open(out).metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "tekken"
    tok, ref = Tokenizer.from_path(out), Tokenizer.from_path(folder)
    assert isinstance(tok, GGUFTokenizer)
    _same_tokenizer(tok, ref)


def _same_tokenizer(tok, ref) -> None:
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (ref.bos_id, ref.eos_id, ref.vocab_size)
    for text in TEXTS:
        ids = ref.encode(text)
        assert tok.encode(text) == ids, text  # control tokens written in text stay text, as mistral-common has it
        assert tok.decode(ids) == ref.decode(ids) == text, text
    ids = [ref.bos_id, 3, *ref.encode("Hello", bos=False), 4, ref.eos_id]
    assert tok.decode(ids) == ref.decode(ids) == "Hello"  # control tokens skipped
    assert tok.is_special(3) and not tok.is_special(ref.encode("Hello", bos=False)[0])


def test_embedded_jinja_chat_template(tiny_mistral, tmp_path):
    """A folder's chat_template.jinja goes into the GGUF; the embedded tokenizer renders
    it, the control tokens it writes becoming control tokens."""
    folder, _ = tiny_mistral
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }}[/INST]{% endfor %}")
    tok = Tokenizer.from_path(alone(convert(src, tmp_path / "m.gguf", "gguf"), tmp_path / "alone"))
    ref = Tokenizer.from_path(folder)
    turns = ["Say hi", "there", "  Two spaces"]
    ids = tok.encode_chat([{"role": r, "content": c} for r, c in zip(("user", "assistant", "user"), turns, strict=True)])
    assert ids == [1, *(i for c in turns for i in (3, *ref.encode(c, bos=False), 4))]


def test_mistral_common_file_beside_the_gguf_wins(tiny_mistral, tmp_path):
    folder, _ = tiny_mistral
    out = convert(folder, tmp_path / "m.gguf", "gguf")
    shutil.copy(folder / "tokenizer.model.v3", tmp_path)
    assert isinstance(Tokenizer.from_path(out), MistralCommonTokenizer)


def test_llm_runs_a_gguf_as_its_folder(tiny_mistral, tmp_path, capsys):
    folder, _ = tiny_mistral
    out = alone(convert(folder, tmp_path / "m.gguf", "gguf"), tmp_path / "alone")
    llm, ref = LLM(out, dtype="float32", device="cpu"), LLM(folder, dtype="float32", device="cpu")
    assert llm.checkpoint.layout == "gguf" and isinstance(llm.tokenizer, GGUFTokenizer)
    a, b = llm.generate("Once upon a time", GREEDY)[0], ref.generate("Once upon a time", GREEDY)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert main(["generate", str(out), "--prompt", "Once upon a time", "--max-tokens", "12", "--temperature", "0",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    # llama.cpp's converter names a built-in chat template for Mistral tokenizers, which
    # only llama.cpp renders: said, with the way out.
    with pytest.raises(TokenizerError, match="mistral-v3.*tokenizer.model"):
        llm.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert a.text in capsys.readouterr().out


# ------------------------------------------------------------------ errors


def _minimal(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]]) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(path, arch)
    w.add_block_count(1)
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_named(tmp_path):
    path = _minimal(tmp_path / "g.gguf", "gemma2", {"token_embd.weight": (np.zeros((8, 4), np.float32), None)})
    with pytest.raises(ConfigError, match=r"architecture 'gemma2'.*llama, mistral3"):
        load_model(path, device="cpu")


def test_unsupported_tensor_type_is_named(tmp_path):
    from gguf import GGMLQuantizationType

    q4_1 = np.zeros((4, 20), np.uint8)  # one Q4_1 block (32 weights, 20 bytes) per row
    path = _minimal(tmp_path / "q.gguf", "llama", {"token_embd.weight": (np.zeros((8, 32), np.float32), None),
                                                   "blk.0.attn_q.weight": (q4_1, GGMLQuantizationType.Q4_1)})
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_q\.weight.*Q4_1 is not supported"):
        GGUFCheckpoint.open(path)


def test_truncated_file_names_the_tensor(tiny_mistral, tmp_path):
    folder, _ = tiny_mistral
    out = convert(folder, tmp_path / "m.gguf", "gguf")
    last = max(GGUFCheckpoint.open(out).reader.tensors, key=lambda t: t.data_offset).name
    with open(out, "r+b") as f:
        f.truncate(out.stat().st_size - 100)
    with pytest.raises(ModelLoadError, match=rf"{last}.*truncated"):
        load_model(out, device="cpu")
    with open(out, "r+b") as f:
        f.truncate(40)  # inside the metadata
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(out, device="cpu")


def test_a_folder_without_a_mistral_tokenizer_is_refused(tiny_mistral, tmp_path):
    folder, _ = tiny_mistral
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "tokenizer.model.v3").unlink()
    with pytest.raises(ModelLoadError, match="embeds its tokenizer"):
        convert(src, tmp_path / "m.gguf", "gguf")
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------ llama.cpp


def _llamacpp_converter():
    """benchmarks/llamacpp_baseline.py's offline run of llama.cpp's convert_hf_to_gguf.py
    (from the llama-cpp-python sdist under $GALERNE_BENCH_CACHE/llamacpp), or a skip."""
    from benchmarks import llamacpp_baseline as lb

    if not (lb.CONVERTER_DIR / "convert_hf_to_gguf.py").is_file() and not glob.glob(lb.SDIST_GLOB):
        pytest.skip(f"llama.cpp's converter is absent: no {lb.CONVERTER_DIR} and no sdist at {lb.SDIST_GLOB} "
                    "(set GALERNE_BENCH_CACHE to a cache that has them)")
    pytest.importorskip("mistral_common")
    return lb


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama_cpp is not importable ({e})")
    return llama_cpp


def _prompt_logits(llm, ids) -> torch.Tensor:
    return llm.score(ids)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral", "ministral3", "mixtral"])
def test_llamacpp_converted_file_matches_transformers(kind, tiny_factory, tmp_path):
    """llama.cpp's own converter: arch llama for Mistral and Mixtral (experts stacked),
    mistral3 (YaRN + llama-4 query scaling) for Ministral 3; q/k rows already in
    galerne's interleaved order."""
    lb = _llamacpp_converter()
    folder, ref = tiny_factory(kind)
    out = lb.convert_hf_to_gguf(folder, tmp_path / "f32.gguf", "f32")
    ckpt = GGUFCheckpoint.open(out)
    assert ckpt.arch == ("mistral3" if kind == "ministral3" else "llama")
    llm = LLM(out, dtype="float32", device="cpu")
    ids = (PROMPT * 4)[:40]  # past the tiny Ministral 3's original context of 16: YaRN and query scaling count
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(_prompt_logits(llm, ids), expected, atol=1e-4, rtol=1e-4)
    # Its embedded tokenizer (nothing beside the file) encodes as mistral-common.
    assert isinstance(llm.tokenizer, GGUFTokenizer)
    _same_tokenizer(llm.tokenizer, Tokenizer.from_path(folder))
    if kind == "ministral3":
        a = ckpt.args
        assert a.yarn is not None and a.query_scaling is not None and a.query_scaling.beta == pytest.approx(0.1)
        assert a.yarn.magnitude == pytest.approx(1.0)


@pytest.mark.slow
def test_llamacpp_q8_0_file_matches_its_dequantized_weights(tiny_mistral, tmp_path):
    """A Q8_0 file from llama_model_quantize: its blocks are galerne's own q8_0 of the
    f32 weights, byte for byte, and the model that keeps them quantized gives the
    logits of the same model built from their dequantized values."""
    lb = _llamacpp_converter()
    _llama_cpp()
    folder, _ = tiny_mistral
    f32 = lb.convert_hf_to_gguf(folder, tmp_path / "f32.gguf", "f32")
    q8 = lb.convert_hf_to_gguf(folder, tmp_path / "q8.gguf", "q8_0")
    floats = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFCheckpoint.open(f32).reader.tensors}
    ckpt = GGUFCheckpoint.open(q8)
    for t in ckpt.reader.tensors:
        if t.tensor_type.name == "Q8_0":
            assert np.array_equal(np.array(t.data), quantize(floats[t.name], "q8_0").numpy()), t.name
    model, _ = load_model(q8, dtype="float32", device="cpu")
    assert isinstance(model.layers[0].attention.wq, QuantLinear)
    dense = build_model(ckpt.args, ((p, n, native, t.dense() if isinstance(t, QTensor) else t)
                                    for p, n, native, t in ckpt.native_tensors()),
                        dtype="float32", device="cpu", config_name="gguf", where=str(q8), desc="", progress=False)
    tok = Tokenizer.from_path(folder)
    a = LLM.from_model(model, tok).score(PROMPT)
    b = LLM.from_model(dense, tok).score(PROMPT)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind,scheme", [("mistral", None), ("mistral", "q8_0"), ("ministral3", None),
                                         ("mixtral", None), ("mixtral", "q8_0")])
def test_llamacpp_reads_galerne_files(kind, scheme, tiny_factory, tmp_path):
    """llama.cpp loads a GGUF galerne wrote (tokenizer included) and, on its weights, makes
    the greedy choices galerne makes (Ministral 3: arch mistral3, YaRN and query scaling
    past the original context of 16)."""
    llama_cpp = _llama_cpp()
    folder, _ = tiny_factory(kind)
    out = alone(convert(folder, tmp_path / "m.gguf", "gguf", scheme=scheme), tmp_path / "alone")
    lc = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, verbose=False, seed=0)
    text = "Once upon a time"
    assert lc.tokenize(text.encode(), add_bos=True) == Tokenizer.from_path(folder).encode(text)
    theirs = []
    for t in lc.generate(PROMPT, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == GREEDY.max_tokens:
            break
    # (12 + 12 tokens: past the tiny Ministral 3's original context of 16. llama.cpp rounds
    # activations to 8 bits against Q8_0 weights: a longer run may meet a near-tie.)
    ours = LLM(out, dtype="float32", device="cpu").generate([PROMPT], GREEDY)[0].token_ids
    assert theirs == ours


@pytest.mark.slow
# llama-cpp-python's log callback decodes each log chunk as UTF-8, and a chunk may cut a
# tekken token's bytes: its own error, in a callback, which pytest reports as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_llamacpp_q4_k_m_file_loads(wide, tmp_path, caplog):
    """A Q4_K_M file from llama_model_quantize (Q4_K, and Q6_K for the output, some
    attn_v and ffn_down): Q4_K read as it is, Q6_K through q8_0, and the logits those of
    the model built from the file's exact dequantized values, within the q8_0 rounding
    of the Q6_K tensors. (llama.cpp's own logits are farther from them: it rounds the
    activations to 8 bits for its K-quant dot products.)"""
    import ctypes

    lb = _llamacpp_converter()
    llama_cpp = _llama_cpp()
    f32 = tmp_path / "f32.gguf"
    lb._run_converter(wide, f32, "f32")  # (tekken.json and no tokenizer.json: its Mistral vocabulary path)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    out = tmp_path / "q4_k_m.gguf"
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    ckpt = GGUFCheckpoint.open(out)
    types = [t.tensor_type.name for t in ckpt.reader.tensors]
    assert "Q4_K" in types and "Q6_K" in types
    with caplog.at_level("INFO", logger="galerne.weights.gguf"):
        model, _ = load_model(out, dtype="float32", device="cpu")
    assert f"{types.count('Q6_K') + types.count('Q5_K')} tensor(s) in Q5_K/Q6_K" in caplog.text
    assert model.layers[0].feed_forward.w1.scheme.name == "q4_k"
    exact = build_model(ckpt.args, ((p, n, native, t.dense() if isinstance(t, QTensor) else t)
                                    for p, n, native, t in ckpt.native_tensors(raw=True)),
                        dtype="float32", device="cpu", config_name="gguf", where=str(out), desc="", progress=False)
    tok = Tokenizer.from_path(wide)
    a, b = LLM.from_model(model, tok).score(SMALL_PROMPT), LLM.from_model(exact, tok).score(SMALL_PROMPT)
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
