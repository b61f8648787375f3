"""Activation patching on every tiny architecture, against independent references.

- the batched and the prefix-KV paths equal the naive loop (one plain hooked forward per patch);
- patching clean into clean changes nothing; restoring the whole last residual stream gives the clean run;
- the clean baseline equals a plain HF forward of the clean prompt (no hooks of ours attached);
- bad input says what was wrong, and no hook is left behind."""
import pytest, torch
from headscope.models import tiny_model, TINY_ARCHS
from headscope.causal.patching import activation_patching, naive_patching, logit_diff, ioi_pairs, fact_pairs, FACTS

def _pair(seed=0, n_pos=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (2, n_pos), generator=g), torch.randint(3, 200, (2, n_pos), generator=g)

metric = lambda lg: logit_diff(lg, 5, 6)

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fast_paths_equal_naive_loop(arch):
    m = tiny_model(arch, n_layers=2, seed=1)
    clean, corrupt = _pair()
    for kind, pos in [("z", -1), ("v", -1), ("resid_pre", "each")]:
        ref = naive_patching(m, clean, corrupt, metric, kind, pos)
        for bs, reuse in [(3, False), (64, True)]:
            got = activation_patching(m, clean, corrupt, metric, kind, pos, batch_size=bs, reuse_prefix=reuse, progress=False)
            torch.testing.assert_close(got.raw, ref, atol=1e-4, rtol=0)

@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2", "gpt_neox"])
def test_sanity_and_baselines(arch):
    m = tiny_model(arch, n_layers=2, seed=2)
    clean, corrupt = _pair(1)
    same = activation_patching(m, clean, clean, metric, "z", -1, progress=False)
    torch.testing.assert_close(same.raw, torch.full_like(same.raw, same.clean), atol=1e-4, rtol=0)
    full = activation_patching(m, clean, corrupt, metric, "resid_post", None, layers=[1], progress=False)
    torch.testing.assert_close(full.scores, torch.ones(1), atol=1e-4, rtol=0)
    with torch.no_grad():                                     # baselines from plain HF forwards
        ref_c = metric(m(input_ids=clean).logits[:, -1]).mean()
        ref_k = metric(m(input_ids=corrupt).logits[:, -1]).mean()
    assert abs(full.clean - float(ref_c)) < 1e-4 and abs(full.corrupt - float(ref_k)) < 1e-4

def test_errors_and_no_leftover_hooks():
    m = tiny_model("llama", n_layers=2)
    clean, corrupt = _pair()
    with pytest.raises(ValueError, match=r"clean is \[2, 6\], corrupted is \[2, 4\]"):
        activation_patching(m, clean, corrupt[:, :4], metric, progress=False)
    with pytest.raises(ValueError, match="choose one of"):
        activation_patching(m, clean, corrupt, metric, kind="mlp", progress=False)
    def bad(lg): raise RuntimeError("metric failed")
    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patching(m, clean, corrupt, bad, progress=False)
    n_hooks = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())
    assert n_hooks == 0
    with torch.no_grad(): a = m(input_ids=clean).logits
    activation_patching(m, clean, corrupt, metric, progress=False)
    with torch.no_grad(): assert torch.equal(m(input_ids=clean).logits, a)

@pytest.mark.slow
def test_smollm2_datasets_and_prefix(smollm2):
    pairs = ioi_pairs(smollm2.tokenizer, n=4)
    tok = smollm2.tokenizer
    lens = {len(tok.encode(p, add_special_tokens=False)) for p in pairs.clean + pairs.corrupt}
    assert len(lens) == 1                                        # one token length: patchable
    assert all(len(tok.encode(tok.decode(int(i)), add_special_tokens=False)) == 1 for i in torch.cat([pairs.correct, pairs.wrong]))
    ev = pairs.evaluate(smollm2)
    assert ev["clean"]["top1"] >= 0.75 and ev["clean"]["logit_diff"] > ev["corrupt"]["logit_diff"] + 2
    fp = fact_pairs(tok, model=smollm2)
    assert fp.evaluate(smollm2)["clean"]["top1"] == 1.0          # only facts the model gets right are kept
    metric = pairs.logit_diff()
    layers = [22, 23]
    ref = naive_patching(smollm2, pairs.clean, pairs.corrupt, metric, "z", -1, layers=layers)
    got = activation_patching(smollm2, pairs.clean, pairs.corrupt, metric, "z", -1, layers=layers, progress=False)
    torch.testing.assert_close(got.raw, ref, atol=1e-4, rtol=0)
