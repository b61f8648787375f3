"Tests for `headscope.data.corpora` and `headscope.sae.activations`: corpora, streamed and cached activations against independent references"
from itertools import islice
from pathlib import Path
import json
import numpy as np
import pytest
import torch
from headscope.models import tiny_model
from headscope.cache import run_with_cache
from headscope.arch import HookNameError
from headscope.data.corpora import python_docs_corpus, stdlib_corpus, text_corpus, token_windows
from headscope.sae.activations import ActivationStore, cache_activations, DiskActivations
from _checks import assert_no_hooks, hook_state

TEXTS = python_docs_corpus()[:4]

@pytest.fixture(scope="module")
def tiny(): return tiny_model("llama", n_layers=3, seed=1)

def _rows_sorted(a): a = a.double().numpy(); return a[np.lexsort(a.T[::-1])]

def test_corpora():
    docs = python_docs_corpus()
    from pydoc_data.topics import topics
    assert sorted(docs) == sorted(topics.values())
    src = stdlib_corpus()
    assert len(src) > 200
    assert any("def namedtuple" in s for s in src)               # collections/__init__.py
    assert not any("class IdleConf" in s for s in src)           # idlelib skipped
    assert stdlib_corpus(max_files=3) == src[:3]

def test_text_corpus_hf_like(tmp_path):
    class DS:   # the two things text_corpus uses of a `datasets.Dataset`
        column_names = ["text", "label"]
        rows = [{"text": "a b", "label": 0}, {"text": "c", "label": 1}]
        def __getitem__(self, i): return self.rows[i]
        def __len__(self): return len(self.rows)
        def __iter__(self): return iter(self.rows)
    c = text_corpus(DS())
    assert list(c) == ["a b", "c"] and list(c) == ["a b", "c"]   # re-iterable
    with pytest.raises(KeyError, match="columns are"): text_corpus(DS(), text_key="content")
    (tmp_path / "x.txt").write_text("file text")
    assert text_corpus([tmp_path / "x.txt", "inline"]) == ["file text", "inline"]
    with pytest.raises(FileNotFoundError): text_corpus(tmp_path / "missing.txt")

def test_token_windows_concatenate(tiny):
    tok = tiny.tokenizer
    ws = torch.stack(list(token_windows(tok, TEXTS, 33)))
    assert (ws[:, 0] == tok.bos_token_id).all()
    flat = [t for i, s in enumerate(TEXTS) for t in ([tok.eos_token_id] if i else []) + tok(s, add_special_tokens=False)["input_ids"]]
    assert ws[:, 1:].reshape(-1).tolist() == flat[:ws[:, 1:].numel()]   # an independent concatenation

@pytest.mark.parametrize("arch,name,width", [("llama", "blocks.1.hook_resid_post", 64), ("gpt2", "blocks.0.hook_mlp_out", 64),
                                             ("qwen2", "blocks.1.attn.hook_z", 64), ("llama", "blocks.0.mlp.hook_post", 256)])
def test_acts_equal_run_with_cache(arch, name, width):
    m = tiny_model(arch, n_layers=2, seed=2)
    before = hook_state(m)   # HF may add its own output recorders: compare, not assume none
    st = ActivationStore(m, name, TEXTS, seq_len=24, batch_size=4)
    w = torch.stack(list(islice(st.windows(), 4)))
    ref = run_with_cache(m, w, names=[name])[name]           # full forward, our cache
    ref = ref.reshape(4, 24, -1)[:, 1:].reshape(-1, width)
    torch.testing.assert_close(st.acts(w), ref, rtol=0, atol=1e-6)
    assert st.d_in == width
    assert_no_hooks(m, before)

def test_stops_early_and_matches_plain_hf():
    tiny = tiny_model("llama", n_layers=3, seed=1)
    name = "blocks.0.hook_resid_post"
    st = ActivationStore(tiny, name, TEXTS, seq_len=16, batch_size=2, skip_bos=False)
    w = torch.stack(list(islice(st.windows(), 2)))
    calls = []
    hs = [blk.register_forward_hook(lambda *a, l=l: calls.append(l)) for l, blk in enumerate(tiny.model.layers)]
    head = tiny.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    try: got = st.acts(w)
    finally:
        for h in hs + [head]: h.remove()
    assert calls == [0]                                       # layers 1, 2 and the unembedding never ran
    with torch.no_grad(): hf = tiny(w, output_hidden_states=True).hidden_states[1]   # plain HF, no headscope hooks
    torch.testing.assert_close(got, hf.reshape(-1, 64), rtol=0, atol=1e-6)

def test_shuffled_stream_is_a_permutation(tiny):
    name = "blocks.1.hook_resid_post"
    st = ActivationStore(tiny, name, TEXTS, seq_len=16, batch_size=4, buffer_size=150, seed=3)
    out = torch.cat(list(st.batches(64)))
    ws = torch.stack(list(st.windows()))
    ref = run_with_cache(tiny, ws, names=[name])[name][:, 1:].reshape(-1, 64)
    assert out.shape == ref.shape
    np.testing.assert_allclose(_rows_sorted(out), _rows_sorted(ref), atol=1e-5)
    first = ref[:64]
    assert not torch.allclose(out[:64], first)                # shuffled, not in corpus order
    st2 = ActivationStore(tiny, name, TEXTS, seq_len=16, batch_size=4, buffer_size=150, seed=3)
    torch.testing.assert_close(st2.next_batch(64), out[:64], rtol=0, atol=0)   # same seed, same order

def test_bf16_autocast(tiny):
    name = "blocks.1.hook_resid_post"
    f = ActivationStore(tiny, name, TEXTS, seq_len=16)
    b = ActivationStore(tiny, name, TEXTS, seq_len=16, dtype=torch.bfloat16)
    w = torch.stack(list(islice(f.windows(), 2)))
    a32, a16 = f.acts(w), b.acts(w)
    assert a16.dtype == torch.bfloat16 and tiny.dtype == torch.float32   # weights untouched
    assert (a16.float() - a32).norm() / a32.norm() < 0.05
    assert not torch.equal(a16.float(), a32.to(torch.bfloat16).float())  # the forward itself ran in bf16

def test_bad_hook_name(tiny):
    with pytest.raises(HookNameError, match="out of range"): ActivationStore(tiny, "blocks.7.hook_resid_post", TEXTS)
    with pytest.raises(HookNameError, match="Nearest valid names"): ActivationStore(tiny, "blocks.0.hook_resid_pots", TEXTS)
    with pytest.raises(ValueError, match="one vector per token"): ActivationStore(tiny, "blocks.0.attn.hook_pattern", TEXTS)

def test_hooks_gone_after_error(tiny):
    before = hook_state(tiny)
    st = ActivationStore(tiny, "blocks.1.hook_resid_post", TEXTS, seq_len=16)
    with pytest.raises(IndexError): st.acts(torch.full((1, 4), 10_000))   # id outside the vocabulary
    assert_no_hooks(tiny, before)
    st.acts(torch.stack(list(islice(st.windows(), 1)))); assert_no_hooks(tiny, before)
    ActivationStore(tiny, "blocks.0.attn.hook_z", TEXTS, seq_len=16).acts(torch.stack(list(islice(st.windows(), 1))))
    assert_no_hooks(tiny, before)   # attention switched back too

def _files(d): return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_resume_byte_identical(tiny, tmp_path, capsys, dtype):
    kw = dict(model=tiny, hook_name="blocks.1.hook_resid_post", corpus=TEXTS, seq_len=16, batch_size=3, dtype=dtype)
    full = cache_activations(kw, tmp_path / "full", n_tokens=400, shard_tokens=100, progress=False)
    est = capsys.readouterr().out
    nb = 400 * 64 * (4 if dtype == torch.float32 else 2)
    assert full.nbytes == nb and len(full) == 400 and full.complete
    assert "400 tokens × 64 ×" in est
    # the printed estimate equals the bytes of data on disk (npy headers aside)
    data = sum(np.load(tmp_path / "full" / s, mmap_mode="r").nbytes for s in _files(tmp_path / "full") if s.endswith(".npy"))
    assert data == nb

    st = ActivationStore(**kw); real, n = st.acts, [0]
    def flaky(toks):
        n[0] += 1
        if n[0] == 4: raise KeyboardInterrupt   # call 1 probes d_in; shard 0 (windows 0-5) takes calls 2-3; dies in shard 1
        return real(toks)
    st.acts = flaky
    with pytest.raises(KeyboardInterrupt): cache_activations(st, tmp_path / "part", n_tokens=400, shard_tokens=100, progress=False)
    man = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert [s["file"] for s in man["shards"]] == ["shard_00000.npy"]
    part = DiskActivations(tmp_path / "part"); assert not part.complete and len(part) == 90   # 6 windows × 15
    st2 = ActivationStore(**kw); calls = [0]; r2 = st2.acts
    st2.acts = lambda t: (calls.__setitem__(0, calls[0] + 1), r2(t))[1]
    cache_activations(st2, tmp_path / "part", n_tokens=400, shard_tokens=100, progress=False)
    assert "1 already done" in capsys.readouterr().out
    assert calls[0] == 1 + 7   # the d_in probe, then shards 1-4 only (2+2+2+1 forwards): shard 0 is not recomputed
    assert _files(tmp_path / "part") == _files(tmp_path / "full")

def test_cache_matches_store_and_reader(tiny, tmp_path):
    kw = dict(model=tiny, hook_name="blocks.0.hook_mlp_out", corpus=TEXTS, seq_len=16, batch_size=4)
    disk = cache_activations(kw, tmp_path, n_tokens=250, shard_tokens=64, progress=False)
    st = ActivationStore(**kw)
    ws = torch.stack(list(islice(st.windows(), 17)))
    ref = run_with_cache(tiny, ws, names=["blocks.0.hook_mlp_out"])["blocks.0.hook_mlp_out"][:, 1:].reshape(-1, 64)[:250]
    torch.testing.assert_close(disk.read(np.arange(250)), ref, rtol=0, atol=1e-5)
    idx = np.array([249, 3, 100, 3, 61])
    torch.testing.assert_close(disk.read(idx), ref[idx], rtol=0, atol=1e-5)
    r = DiskActivations(tmp_path, batch_size=100, seed=5)
    assert all(isinstance(s, np.memmap) for s in r.shards)   # never loaded into memory
    b1 = torch.cat(list(r)); b2 = torch.cat(list(r))
    assert [len(b) for b in DiskActivations(tmp_path, batch_size=100)] == [100, 100, 50]
    np.testing.assert_allclose(_rows_sorted(b1), _rows_sorted(ref), atol=1e-5)
    assert not torch.equal(b1, b2)                           # a new epoch reshuffles
    torch.testing.assert_close(torch.cat(list(DiskActivations(tmp_path, batch_size=100, seed=5))), b1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings"):
        cache_activations({**kw, "seq_len": 32}, tmp_path, n_tokens=250, progress=False)

def test_second_writer_refused(tiny, tmp_path):
    "Another process holding the folder's lock: cache_activations refuses at once (no forward, no manifest.tmp crash)"
    import subprocess, sys
    tmp_path.mkdir(exist_ok=True)
    code = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        st = ActivationStore(tiny, "blocks.1.hook_resid_post", TEXTS, seq_len=16, batch_size=3)
        calls = [0]; real = st.acts
        st.acts = lambda t: (calls.__setitem__(0, calls[0] + 1), real(t))[1]
        with pytest.raises(RuntimeError, match="being written by another cache_activations run"):
            cache_activations(st, tmp_path, n_tokens=60, shard_tokens=30, progress=False)
        assert calls[0] == 0 and not (tmp_path / "manifest.json").exists()
    finally: p.kill(); p.wait()
    assert len(cache_activations(st, tmp_path, n_tokens=60, shard_tokens=30, progress=False)) == 60   # free once it is gone
