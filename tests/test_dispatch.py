"""Models dispatched by accelerate (device_map, CPU and disk offload) against the same model in one piece.

Each test builds two copies of one tiny model: `ref` stays whole, `m` is dispatched with accelerate (block 0 in
CPU memory, blocks 1 and 2 offloaded to files, or every weight offloaded), and every headscope call must give
the numbers of `ref`: the same ops run on the same CPU, so they are compared exactly. Offloaded parameters are
on the meta device between forwards: weight-side calls read them through accelerate's hooks."""
import tempfile
import pytest, torch, transformers
from accelerate import dispatch_model, cpu_offload, disk_offload, infer_auto_device_map
from accelerate.utils import compute_module_sizes
from headscope.models import tiny_model
from headscope.arch import blocks, head_out_weights
from headscope.dispatch import layer_devices, input_device, compute_devices, module_tensor, MetaWeightError
from headscope.cache import run_with_cache
from headscope.hooking import run_with_hooks
from headscope.interventions import ablate, patch, generate

ARCHS = ["llama", "gpt2", "gpt_neox", "gemma2"]
PROMPT, CLEAN, CORRUPT = "Hello there, friend", "a cat", "a dog"   # pairs shorter than gemma2's sliding window (8)
metric = lambda lg: lg[:, 5] - lg[:, 7]

def _tiny(arch, **kw):
    with pytest.warns(UserWarning) if arch == "gemma2" else _nothing(): return tiny_model(arch, n_layers=3, **kw)   # gemma2: eager, with a warning

class _nothing:
    def __enter__(self): return self
    def __exit__(self, *a): return False

def _block_names(model)->list[str]:
    ids = {id(b): i for i, b in enumerate(blocks(model))}
    return [n for n, mod in model.named_modules() if id(mod) in ids]

def split_map(model, where=("cpu", "disk", "disk"))->dict:
    "A device map naming every block (`where[l]`) and every other top module ('cpu'; the unembedding on disk unless tied)"
    names = _block_names(model)
    base, top = names[0].rsplit(".", 1)[0], names[0].split(".")[0]
    dm = dict(zip(names, where))
    dm.update({f"{top}.{n}": "cpu" for n, _ in model.get_submodule(top).named_children() if f"{top}.{n}" != base})
    # a tied unembedding stays with the embedding (offloading one half of a tied pair fails inside accelerate)
    dm.update({n: ("cpu" if model.config.tie_word_embeddings else "disk") for n, _ in model.named_children() if n != top})
    return dm

@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    "(ref, m): the same tiny model whole and dispatched with block 0 in CPU memory, blocks 1-2 (and the untied unembedding) on disk"
    ref, m = _tiny(request.param), _tiny(request.param)
    return ref, dispatch_model(m, split_map(m), main_device="cpu", offload_dir=str(tmp_path_factory.mktemp("off")))

def _hook_state(model):
    "PyTorch hooks on every module (headscope's), and accelerate's hook objects by module name"
    n = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())
    return n, {k: mod._hf_hook for k, mod in model.named_modules() if hasattr(mod, "_hf_hook")}

def _same(a, b):
    assert a.shape == b.shape and torch.equal(a, b), f"max |diff| {float((a.float() - b.float()).abs().max())}"

def test_placement(pair):
    ref, m = pair
    pl = layer_devices(m)
    assert pl.offloaded()[:2] == ["L1", "L2"] and pl.weights[1:4] == ["cpu", "disk", "disk"]
    assert all(p.device.type == "meta" for p in blocks(m)[1].parameters())
    assert input_device(m) == torch.device("cpu") and compute_devices(m) == [torch.device("cpu")]
    assert layer_devices(ref).offloaded() == []
    assert "disk" in pl._repr_html_() and "L2: cpu (weights disk)" in repr(pl)

def test_cache_every_hook_point(pair):
    ref, m = pair
    before = _hook_state(m)
    c, c0 = run_with_cache(m, [PROMPT, "Hi"]), run_with_cache(ref, [PROMPT, "Hi"])   # padded batch: masks and positions too
    assert list(c) == list(c0) and len(c) > 40
    for k in c0: _same(c[k], c0[k])
    _same(c.logits, c0.logits)
    _same(c.resid_stack(), c0.resid_stack())
    d = run_with_cache(m, PROMPT, names="blocks.*.hook_resid_post", device="cpu", dtype=torch.float64)
    assert d["resid_post", 2].dtype == torch.float64 and d["resid_post", 2].device == torch.device("cpu")
    _same(d["resid_post", 2], run_with_cache(ref, PROMPT, names="blocks.2.hook_resid_post")["resid_post", 2].double())
    assert _hook_state(m) == before                                   # ours gone, accelerate's the same objects
    assert all(p.device.type == "meta" for p in blocks(m)[2].parameters())

def test_replacement_hooks_and_generation(pair):
    ref, m = pair
    before = _hook_state(m)
    v = torch.randn(ref.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    fh = [("blocks.1.attn.hook_z", ablate(head=1)), ("blocks.2.hook_resid_pre", lambda a, h: a * 0.5),
          ("blocks.2.hook_mlp_out", patch(v, pos=-1)), ("blocks.1.attn.hook_pattern", ablate(pos=[0, 2], head=0))]
    out, out0 = run_with_hooks(m, PROMPT, fh), run_with_hooks(ref, PROMPT, fh)
    _same(out, out0)
    assert not torch.equal(out, run_with_hooks(ref, PROMPT))         # the hooks did something
    g = [("blocks.0.attn.hook_z", ablate(head=0))]
    assert generate(m, [PROMPT, "Hi"], max_new_tokens=6, hooks=g) == generate(ref, [PROMPT, "Hi"], max_new_tokens=6, hooks=g)
    assert _hook_state(m) == before

def test_patching_family(pair):
    from headscope.causal.patching import activation_patching
    from headscope.causal.paths import path_patching
    from headscope.causal.attribution import attribution_patching
    ref, m = pair
    for f in (lambda mm: activation_patching(mm, CLEAN, CORRUPT, metric, kind="z", progress=False),
              lambda mm: activation_patching(mm, CLEAN, CORRUPT, metric, kind="resid_pre", pos="each", progress=False),
              lambda mm: path_patching(mm, CLEAN, CORRUPT, metric, progress=False),
              lambda mm: attribution_patching(mm, CLEAN, CORRUPT, metric, progress=False)):
        _same(f(m).scores, f(ref).scores)
    assert _hook_state(m)[0] == 0

def test_steering(pair):
    from headscope.probes.steering import diff_in_means, steer, steer_generate
    ref, m = pair
    pos, neg = ["good day", "nice one"], ["bad day", "awful one"]
    v, v0 = diff_in_means(m, pos, neg, layers=[1, 2], progress=False), diff_in_means(ref, pos, neg, layers=[1, 2], progress=False)
    for l in (1, 2): _same(v.vectors[l], v0.vectors[l])
    with steer(m, v0, coeff=4.0, pos="prompt"): out = run_with_hooks(m, PROMPT)
    with steer(ref, v0, coeff=4.0, pos="prompt"): out0 = run_with_hooks(ref, PROMPT)
    _same(out, out0)
    assert str(steer_generate(m, PROMPT, v0, 1, 8.0, max_new_tokens=5)) == str(steer_generate(ref, PROMPT, v0, 1, 8.0, max_new_tokens=5))

def test_head_census(pair):
    from headscope.heads.census import head_census
    ref, m = pair
    kw = dict(text="The quick brown fox jumps over the lazy dog. " * 4, n_seq=2, seq_len=16, retrieval=False,
              gradient_samples=2, sinks=False, ablation_dtype=None, progress=False)
    s, s0 = head_census(m, **kw).scores, head_census(ref, **kw).scores
    assert list(s) == list(s0) and len(s) > 5
    for k in s0: _same(s[k], s0[k])

def test_weights_through_offload(pair):
    from headscope.weights.core import model_weights
    from headscope.weights.circuits import qk_circuit
    ref, m = pair
    for fold in (False, True):
        w, w0 = model_weights(m, fold_norms=fold), model_weights(ref, fold_norms=fold)
        for n in ("W_E", "W_Q", "W_K", "W_V", "b_Q", "W_in", "W_out", "b_out", "W_U", "b_U", "QK"):
            a, b = getattr(w, n), getattr(w0, n)
            if n == "QK": a, b = a.AB, b.AB
            _same(a, b)
    _same(qk_circuit(m, 2, 1).AB, qk_circuit(ref, 2, 1).AB)
    assert all(p.device.type == "meta" for p in blocks(m)[2].parameters())   # read, not onloaded for good

def test_weight_edits(pair):
    "An in-place weight edit of an offloaded MLP is refused (it would be lost); the same edit as hooks works"
    from headscope.probes.edit import rank1_edit
    ref, m = pair
    d = ref.config.get_text_config().hidden_size
    g = torch.Generator().manual_seed(1)
    u, k = torch.randn(d, generator=g), torch.randn(4 * d, generator=g)    # tiny models: d_mlp = 4 d_model
    e = rank1_edit(m, "MLP2", u, k, lam=0.5)
    with pytest.raises(MetaWeightError, match="edit.hooks"): e.apply(m)
    with e.applied(ref): want = run_with_hooks(ref, PROMPT)
    assert not torch.equal(want, run_with_hooks(ref, PROMPT))
    if ref.config.model_type != "gemma2":   # gemma2 normalises the MLP output before hook_mlp_out: no hook form there
        torch.testing.assert_close(run_with_hooks(m, PROMPT, e.hooks(m)), want, atol=1e-5, rtol=1e-5)
    assert all(p.device.type == "meta" for p in blocks(m)[2].parameters())

def test_out_weights_through_offload(pair):
    from headscope.weights.core import model_weights
    from headscope.weights.circuits import ov_circuit
    ref, m = pair
    _same(head_out_weights(m, 2)[0], head_out_weights(ref, 2)[0].detach())
    _same(model_weights(m).W_O, model_weights(ref).W_O)
    _same(ov_circuit(m, 2, 1).AB, ov_circuit(ref, 2, 1).AB)
    c, c0 = run_with_cache(m, PROMPT, names="blocks.*.attn.hook_z"), run_with_cache(ref, PROMPT, names="blocks.*.attn.hook_z")
    _same(c.stack_head_results(layer=3), c0.stack_head_results(layer=3))
    from headscope.causal.dla import direct_logit_attribution   # reads W_O and the (maybe offloaded) unembedding
    a, a0 = direct_logit_attribution(m, [CLEAN, CORRUPT], answer=5, wrong=7), direct_logit_attribution(ref, [CLEAN, CORRUPT], answer=5, wrong=7)
    for f in ("embed", "heads", "mlps", "total", "lens", "unembed_bias"): _same(getattr(a, f), getattr(a0, f))

def test_meta_without_weights_is_a_clear_error():
    with torch.device("meta"): bare = tiny_model("llama", n_layers=2)
    with pytest.raises(MetaWeightError, match="no accelerate offload hook holds its values.*from_pretrained"):
        module_tensor(bare.model.layers[0].self_attn.q_proj)
    from headscope.weights.core import model_weights
    with pytest.raises(MetaWeightError, match="dispatch_model"): model_weights(bare).W_Q
    with pytest.raises(MetaWeightError, match="load its weights first"): input_device(bare)

def test_infer_auto_device_map_and_from_pretrained(tmp_path):
    "accelerate's own planner under a memory budget, through `from_pretrained(device_map=, offload_folder=)` of a saved tiny model"
    ref = tiny_model("llama", n_layers=3)
    ref.save_pretrained(tmp_path / "m")
    sizes = compute_module_sizes(ref)
    dm = infer_auto_device_map(ref, max_memory={"cpu": sizes[""] - sizes["model.layers.0"]}, no_split_module_classes=ref._no_split_modules)
    assert "disk" in dm.values()
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=dm, offload_folder=str(tmp_path / "off")).eval()
    m.tokenizer = ref.tokenizer
    assert layer_devices(m).offloaded() and m.hf_device_map == dm
    c, c0 = run_with_cache(m, PROMPT), run_with_cache(ref, PROMPT)
    for k in c0: _same(c[k], c0[k])
    _same(c.logits, c0.logits)

def test_load_model_device_map(tmp_path):
    from headscope.models import load_model
    ref = tiny_model("llama", n_layers=3)
    ref.save_pretrained(tmp_path / "m"); ref.tokenizer.save_pretrained(tmp_path / "m")
    m = load_model(tmp_path / "m", device_map=split_map(ref), offload_folder=str(tmp_path / "off"))
    _same(run_with_cache(m, PROMPT).logits, run_with_cache(ref, PROMPT).logits)

@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_whole_model_offloaded(how, tmp_path):
    ref, m = tiny_model("gpt2", n_layers=3), tiny_model("gpt2", n_layers=3)
    m = cpu_offload(m, execution_device="cpu") if how == "cpu_offload" else disk_offload(m, str(tmp_path), execution_device="cpu")
    assert m.device == torch.device("meta") and input_device(m) == torch.device("cpu")
    c, c0 = run_with_cache(m, PROMPT), run_with_cache(ref, PROMPT)
    for k in c0: _same(c[k], c0[k])
    assert generate(m, PROMPT, max_new_tokens=4) == generate(ref, PROMPT, max_new_tokens=4)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: one block computes on cuda:0, the rest on the CPU")
def test_across_devices(tmp_path):
    "Layers on two devices: the cache gathers onto the input device, position/head masks follow each layer's device"
    from headscope.causal.patching import activation_patching
    ref, m = tiny_model("llama", n_layers=3), tiny_model("llama", n_layers=3)
    m = dispatch_model(m, split_map(m, ("cpu", 0, "disk")), main_device="cpu", offload_dir=str(tmp_path))
    assert compute_devices(m) == [torch.device("cpu"), torch.device("cuda:0")] or set(compute_devices(m)) == {torch.device("cpu"), torch.device("cuda:0")}
    c, c0 = run_with_cache(m, [PROMPT, "Hi"]), run_with_cache(ref, [PROMPT, "Hi"])
    assert {v.device for v in c.values()} == {torch.device("cpu")}
    for k in c0: torch.testing.assert_close(c[k], c0[k], atol=1e-4, rtol=1e-4)   # cuda matmuls round differently
    fh = [("blocks.1.attn.hook_z", ablate(pos=-1, head=1)), ("blocks.1.hook_resid_mid", lambda a, h: a * 0.5)]
    torch.testing.assert_close(run_with_hooks(m, PROMPT, fh), run_with_hooks(ref, PROMPT, fh), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(activation_patching(m, CLEAN, CORRUPT, metric, progress=False).scores,
                               activation_patching(ref, CLEAN, CORRUPT, metric, progress=False).scores, atol=1e-3, rtol=1e-3)
    assert layer_devices(m).devices[2] == "cuda:0"
