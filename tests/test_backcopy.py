"""The Bigram-Backcopy toy and ReLU attention (`headscope.toys`) against independent references.

References: a hand-rolled generator on a hand-built deterministic task, ReLU attention written out
with Python loops in float64, the layer's own projections and rotary embedding with plain torch
hooks, and the weights the model itself returns (`output_attentions`)."""
import pytest, torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from headscope.models import tiny_model
from headscope.hooking import hooks
from headscope.cache import run_with_cache
from headscope.toys import (BigramBackcopy, bigram_backcopy, relu_pattern, relu_attention, use_relu_attention,
                            backcopy_model, sink_stats, RELU_ATTENTION)
from _checks import assert_no_hooks

def _cycle_task()->BigramBackcopy:
    "8 symbols, s -> s+1 (mod 8) deterministically, symbol 3 the only trigger"
    trans = torch.zeros(8, 8); trans[torch.arange(8), (torch.arange(8) + 1) % 8] = 1
    return BigramBackcopy(trans, torch.tensor([3]), torch.arange(100, 108), bos=7)

def _by_hand(start:int, L:int)->list:
    x = [start]
    for i in range(1, L): x.append(x[i - 2] if x[i - 1] == 3 and i >= 2 else (x[i - 1] + 1) % 8)
    return [7] + [100 + s for s in x]

def test_generator_rule_on_a_known_task():
    task = _cycle_task()
    ids = task.sample(40, 12, torch.Generator().manual_seed(0))
    for row in ids.tolist(): assert row == _by_hand(row[1] - 100, 12)
    assert 103 not in ids[:, 1].tolist()                       # a sequence never starts with a trigger
    assert {r[1] for r in ids.tolist()} == {100, 101, 102, 104, 105, 106, 107}
    trig, plain = task.queries(torch.tensor([_by_hand(1, 6)]))  # BOS 1 2 3 2 3 2
    assert trig[0].tolist() == [False, False, False, True, False, True, False]
    assert plain[0].tolist() == [False, True, True, False, True, False, True]

def test_task_is_seeded_and_valid():
    a, b = bigram_backcopy(4), bigram_backcopy(4)
    assert torch.equal(a.trans, b.trans) and torch.equal(a.triggers, b.triggers)
    assert not torch.equal(a.trans, bigram_backcopy(5).trans)
    torch.testing.assert_close(a.trans.sum(-1), torch.ones(64))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(a.sample(5, 9, g1), a.sample(5, 9, g2))
    with pytest.raises(ValueError, match="p_trigger"): bigram_backcopy(p_trigger=1.0)

def _relu_loops(q, k, v, scaling):   # q [batch head pos d], k/v [batch kv_head pos d] -> (z [batch pos head d], A)
    b, H, n, d = q.shape
    A = torch.zeros(b, H, n, n, dtype=torch.float64); z = torch.zeros(b, n, H, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(H):
            kv = h // (H // k.shape[1])
            for i in range(n):
                for j in range(i + 1):
                    A[bi, h, i, j] = max(0.0, float(q[bi, h, i] @ k[bi, kv, j]) * scaling) / (i + 1)
                    z[bi, i, h] += A[bi, h, i, j] * v[bi, kv, j].double()
    return z, A

def test_relu_attention_by_hand():
    s = torch.tensor([[[[2., 7], [-1, 4]]]])   # [1 1 2 2]; 7 is above the diagonal: masked
    torch.testing.assert_close(relu_pattern(s), torch.tensor([[[[2., 0], [0, 2]]]]))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 2, 5, 3, generator=g), torch.randn(2, 2, 5, 3, generator=g)
    z, A = relu_attention(torch.nn.Module(), q, k, v, None, scaling=0.7)
    zr, Ar = _relu_loops(q, k, v, 0.7)
    torch.testing.assert_close(A.double(), Ar); torch.testing.assert_close(z.double(), zr)
    # the masks transformers may pass: bool (True = seen) and additive; both mean the same causal mask
    seen = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    add = torch.zeros(1, 1, 5, 5).masked_fill(~seen, torch.finfo(torch.float32).min)
    for m in (seen, add): torch.testing.assert_close(relu_attention(torch.nn.Module(), q, k, v, m, scaling=0.7)[1].double(), Ar)

def test_relu_model_layer_matches_its_own_weights():
    "The model's layer-0 attention output, recomputed from its projections, rotary and o_proj with ReLU in loops"
    model = use_relu_attention(tiny_model("llama", seed=1, n_heads=4, n_kv_heads=2, d_model=32))
    attn = model.model.layers[0].self_attn
    got = {}
    hs = [attn.register_forward_hook(lambda m, a, kw, o: got.__setitem__("out", o[0]), with_kwargs=True),
          attn.register_forward_pre_hook(lambda m, a, kw: got.__setitem__("in", (kw["hidden_states"], kw["position_embeddings"])), with_kwargs=True)]
    ids = torch.tensor([[256, 65, 66, 67, 65, 70]])
    try:
        with torch.no_grad(): model(ids)
    finally:
        for h in hs: h.remove()
    x, (cos, sin) = got["in"]
    D = attn.head_dim
    with torch.no_grad():
        sh = lambda t: t.view(1, 6, -1, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(sh(attn.q_proj(x)), sh(attn.k_proj(x)), cos, sin)
        z, _ = _relu_loops(q, k, sh(attn.v_proj(x)), attn.scaling)
        ref = attn.o_proj(z.float().reshape(1, 6, -1))
    torch.testing.assert_close(got["out"], ref, atol=1e-5, rtol=1e-4)

def test_softmax_path_untouched():
    registry = lambda: (ALL_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    before = registry()
    soft, other = backcopy_model(seed=2), backcopy_model(seed=2)
    ids = bigram_backcopy().sample(3, 10, torch.Generator().manual_seed(1))
    with torch.no_grad(): ref = soft(ids).logits
    relu = use_relu_attention(other)
    with torch.no_grad(): r = relu(ids).logits
    assert not torch.allclose(r, ref, atol=1e-3)                   # the ReLU model does compute something else
    assert soft.config._attn_implementation == "sdpa"
    assert registry() == before
    with torch.no_grad():
        assert torch.equal(soft(ids).logits, ref)                  # bit for bit, after the ReLU model ran
        assert torch.equal(backcopy_model(seed=2)(ids).logits, ref)  # and in a model built afterwards
    # headscope's hooks wrap ReLU attention too: same logits inside, ReLU restored outside
    with hooks(relu, [("blocks.0.attn.hook_v", lambda x, h: None)]):   # a tap inside attention: headscope switches the implementation
        assert relu.config._attn_implementation == "headscope_" + RELU_ATTENTION
        with torch.no_grad(): torch.testing.assert_close(relu(ids).logits, r)
    assert relu.config._attn_implementation == RELU_ATTENTION
    use_relu_attention(backcopy_model())                            # registering twice is harmless
    assert ALL_ATTENTION_FUNCTIONS[RELU_ATTENTION] is relu_attention
    assert_no_hooks(relu)

@pytest.mark.parametrize("relu", [False, True])
def test_sink_stats_against_the_models_own_weights(relu):
    task = bigram_backcopy(1)
    model = backcopy_model(seed=3, relu=relu, n_heads=2)
    if not relu: model.config._attn_implementation = "eager"        # eager returns its softmax weights
    ids = task.sample(6, 12, torch.Generator().manual_seed(2))
    st = sink_stats(model, task, ids)
    assert st.relu == relu and model.config._attn_implementation == ("eager" if not relu else RELU_ATTENTION)
    assert_no_hooks(model)                                           # before transformers' own recorder hooks (output_attentions)
    with torch.no_grad(): att = model(ids, output_attentions=True).attentions
    trig, plain = task.queries(ids)
    trig[:, -1] = plain[:, -1] = False
    for l, A in enumerate(att):
        A = A.double()
        share = A / A.sum(-1, keepdim=True).clamp(min=1e-30)
        for h in range(2):
            torch.testing.assert_close(st.scores["sink"][l, h].double(), share[:, h, :, 0][plain].mean(), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st.scores["sink_trigger"][l, h].double(), share[:, h, :, 0][trig].mean(), rtol=1e-4, atol=1e-6)
            cp = torch.stack([share[b, h, i, i - 1] for b, i in trig.nonzero().tolist()]).mean()
            torch.testing.assert_close(st.scores["copy"][l, h].double(), cp, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(st.scores["off"][l, h].double(), (A[:, h].sum(-1) == 0)[plain].double().mean())
    c = run_with_cache(model, ids, names=[f"blocks.{l}.attn.hook_v" for l in range(2)] + [f"blocks.{l}.hook_resid_post" for l in range(2)])
    for l in range(2):
        vn = c[f"blocks.{l}.attn.hook_v"].norm(dim=-1)           # [batch pos kv_head]; one KV head per head here
        torch.testing.assert_close(st.scores["value_ratio"][l], (vn[:, 0] / vn[:, 1:].median(1).values).mean(0))
        rn = c[f"blocks.{l}.hook_resid_post"].norm(dim=-1)
        torch.testing.assert_close(st.resid_ratio[l], (rn[:, 0] / rn[:, 1:].median(1).values).mean())
    plain_ids = [i for i in task.syms.tolist() if i not in task.syms[task.triggers].tolist()][:5]
    with pytest.raises(ValueError, match="no trigger"): sink_stats(model, task, torch.tensor([[task.bos] + plain_ids]))
    with pytest.raises(ValueError, match="BOS"): sink_stats(model, task, ids[:, 1:])
