"""Spec inference: it reproduces the hand-written hook maps, proves an inferred one on the model, and refuses what it cannot prove."""
import dataclasses, warnings
import pytest, torch, transformers
from torch import nn
from headscope.models import tiny_model
from headscope.arch import arch_spec, model_hook_names, ARCH_SPECS, UnsupportedArchitectureError, _SPECS
from headscope.arch_infer import infer_spec, validate_spec
from _checks import assert_no_hooks, hook_state

# tiny_model name -> the model_type of its hand-written table
HAND = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
        "gemma3": "gemma3_text", "olmo2": "olmo2", "phi3": "phi3", "gpt2": "gpt2", "mixtral": "mixtral",
        "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe", "phimoe": "phimoe"}

def _core(s):
    "a spec without what cannot differ in use: the flag, and an all-MoE model's (never used) dense MLP paths"
    return dataclasses.replace(s, inferred=False, **(dict(mlp_in="", mlp_linear=None, mlp_down="") if s.router else {}))

def _state(m):
    "hooks transformers itself installs (output recording) once a forward asks for hidden states: the baseline to compare with"
    with torch.no_grad(): m(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True, use_cache=False)
    return hook_state(m)

def _build(mt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(mt, vocab_size=259, max_position_embeddings=64, **kw)
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()

@pytest.mark.parametrize("arch", list(HAND))
def test_inference_reproduces_the_hand_written_map(arch):
    m = tiny_model(arch)
    spec = infer_spec(m)
    assert spec.inferred and _core(spec) == _core(ARCH_SPECS[HAND[arch]])
    assert_no_hooks(m)                                  # the trace leaves nothing behind

def test_an_inferred_map_is_proven_once_and_kept():
    m = tiny_model("helium")
    before = _state(m)
    calls = []
    h = m.register_forward_pre_hook(lambda mod, a: calls.append(1))
    try: s = arch_spec(m)
    finally: h.remove()
    assert s.inferred and s.layers == "model.layers" and s.ln2 == "post_attention_layernorm" and len(calls) >= 3   # trace + checks
    calls.clear(); h = m.register_forward_pre_hook(lambda mod, a: calls.append(1))
    try: assert arch_spec(m) is s and not calls      # cached per model: no second inference
    finally: h.remove()
    assert_no_hooks(m, before)

def test_norm_places_come_from_the_trace_not_the_names():
    "`post_attention_layernorm` is Llama's pre-MLP norm and Gemma 2's post-attention norm"
    l, g = infer_spec(tiny_model("llama")), infer_spec(tiny_model("gemma2"))
    assert (l.ln2, l.attn_out) == ("post_attention_layernorm", "self_attn")
    assert (g.ln2, g.attn_out) == ("pre_feedforward_layernorm", "post_attention_layernorm")
    p = infer_spec(tiny_model("phi"))                   # one norm feeds both sublayers
    assert p.parallel and p.ln1 == "input_layernorm" and p.ln2 is None
    assert not [n for n in model_hook_names(tiny_model("phi")) if n.endswith(("hook_mlp_in", "hook_attn_in", "ln2.hook_scale"))]

def test_validation_catches_a_wrong_fused_layout():
    "GPT-NeoX's query_key_value is per head [q k v]; inference's [q | k | v] guess fails the position-0 check"
    m = tiny_model("gpt_neox")
    before = _state(m)
    _SPECS[m] = infer_spec(m)
    try:
        with pytest.raises(UnsupportedArchitectureError, match=r"hook_q \(from attention.query_key_value\) is not, at position 0"):
            validate_spec(m)
    finally: del _SPECS[m]
    assert_no_hooks(m, before)

@pytest.mark.parametrize("mt, kw, why", [
    ("bloom", dict(n_layer=2, hidden_size=64, n_head=4), "BloomAttention computes attention in its own code"),   # its table and port hook it
    ("codegen", dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8), r"hook_q \(from attn.qkv_proj\) is not, at position 0"),
])
def test_refusals_name_the_part(mt, kw, why):
    m = _build(mt, **kw)
    if mt in ARCH_SPECS: m.config.model_type = mt = f"{mt}_like"   # the same code under a name without a table: inference alone refuses it
    before = _state(m)
    with pytest.raises(UnsupportedArchitectureError, match=why) as e:
        arch_spec(m)
    assert f"model_type {mt!r}" in str(e.value) and "Supported: " in str(e.value)
    assert m not in _SPECS                              # a refused map is not kept
    assert_no_hooks(m, before)
    with pytest.raises(UnsupportedArchitectureError): model_hook_names(m)   # every entry point refuses the same way

def test_a_norm_dividing_by_something_else_is_refused():
    "OLMo's weightless LayerNorm is recognised by what it does (it used to be refused); a norm dividing by mean |x| is not one headscope knows"
    assert arch_spec(_build("olmo", num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)).inferred
    class L1Norm(nn.Module):
        def __init__(self, d): super().__init__(); self.weight = nn.Parameter(torch.ones(d))
        def forward(self, x): return self.weight * x / (x.abs().mean(-1, keepdim=True) + 1e-6)
    m = tiny_model("llama")
    m.config.model_type = "llama_l1"                    # no table: inferred, and checked
    for b in m.model.layers: b.input_layernorm = L1Norm(64)
    with pytest.raises(UnsupportedArchitectureError, match=r"ln1 \(L1Norm\) does not divide by what headscope's hook_scale computes"):
        arch_spec(m)

def test_a_block_without_attention_is_named():
    class Blk(nn.Module):
        def __init__(self): super().__init__(); self.mlp = nn.Linear(8, 8); self.norm = nn.LayerNorm(8)
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, vocab_size=10)
            self.config.model_type = "toy"
            self.emb, self.layers = nn.Embedding(10, 8), nn.ModuleList([Blk(), Blk()])
    with pytest.raises(UnsupportedArchitectureError, match=r"no attention module in Blk \(children: mlp, norm\)"):
        arch_spec(Toy())

def test_inferred_sublayer_norms_set_the_flag():
    "`sublayer_norm` comes from the trace: norms reading both sublayers' outputs (Gemma 2, EXAONE 4) set it, Llama's do not"
    assert infer_spec(tiny_model("gemma2")).sublayer_norm and infer_spec(tiny_model("exaone4")).sublayer_norm
    assert not infer_spec(tiny_model("llama")).sublayer_norm and not infer_spec(tiny_model("phi")).sublayer_norm
    m = tiny_model("gemma2")
    m.config.model_type = "gemma2_half"                  # no table: inferred
    for b in m.model.layers: b.post_feedforward_layernorm = nn.Identity()   # a norm after attention only
    with pytest.raises(UnsupportedArchitectureError, match="follows only one sublayer"): infer_spec(m)
