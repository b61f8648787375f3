"""The first CD-T engine, kept as an independent reference for `headscope.causal.cdt`.

It carries `rel` and `irrel` as separate rows `[full | rel x K | irrel x K]` and applies P11's rules to each
explicitly (biases removed from rel, the MLP rule rel' = f(rel + irrel) - f(irrel) as hooks); the library's
engine runs `[full | irrel x K]` and reads rel as full - irrel. Both must agree."""
import torch
from torch import nn, Tensor
from headscope.arch import arch_spec, model_dims, blocks, get_module
from headscope.decompose import _normalise
from headscope.hooking import hooks, forward, _in, _with_in
from headscope.causal.cdt import _rep, _stabilise

def _act(mlp:nn.Module):
    f = next((getattr(mlp, a) for a in ("act_fn", "act", "activation_fn", "activation") if callable(getattr(mlp, a, None))), None)
    if f is None: raise ValueError(f"No activation function (act_fn, act, activation_fn) on {type(mlp).__name__}: CD-T cannot apply P11's MLP rule.")
    return f

class ReferenceEngine:
    "The real run's block inputs, and decomposed runs of blocks `start..` on rows `[full B | rel K·B | irrel K·B]`"
    def __init__(self, model:nn.Module, x:dict, stabilise:bool=True):
        self.model, self.spec, self.dims, self.blks, self.stabilise = model, arch_spec(model), model_dims(model), blocks(model), stabilise
        self.calls, self.B = [None] * len(self.blks), x["input_ids"].shape[0]
        rec = lambda l: lambda mod, args, kwargs: self.calls.__setitem__(l, (args, kwargs))
        hs = [b.register_forward_pre_hook(rec(l), with_kwargs=True) for l, b in enumerate(self.blks)]
        try:
            with torch.no_grad(): self.logits = forward(model, x).logits
        finally:
            for h in hs: h.remove()

    def resid_pre(self, l:int)->Tensor: return _in(*self.calls[l])

    def _rules(self, start:int, K:int)->tuple[list, list]:
        "Raw module hooks (biases, frozen norms) and TL-named hooks (frozen patterns, the MLP rule) for blocks `start..`"
        B, sp, nb, R = self.B, self.spec, K * self.B, self.B * (1 + 2 * K)
        def unbias(mod, args, o):
            if o.shape[0] != R: return None
            o = o.clone(); o[B:B + nb] -= mod.bias.to(o); return o
        def norm(mod, args, kwargs, o):
            x = _in(args, kwargs)
            if x.ndim < 2 or x.shape[0] != R: return None        # e.g. the norm of a row of ones that `_normalise` asks for
            new, b = o.clone(), getattr(mod, "bias", None)
            new[B:] = _normalise(mod, x[:B].repeat(2 * K, *[1] * (x.ndim - 1)), x[B:], weight=True).to(o)
            if isinstance(b, Tensor): new[B + nb:] += b.to(o)
            return new
        pattern = lambda act, hook: torch.cat([act[:B]] * (1 + 2 * K))
        raw, tl, paths = [], [], sorted({sp.ln1, sp.ln2, sp.attn_out if sp.attn_out != sp.attn else None, sp.mlp_out if sp.mlp_out != sp.mlp else None} - {None})
        for l in range(start, len(self.blks)):
            blk = self.blks[l]
            raw += [(m, unbias, False) for m in blk.modules() if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")   # GPT-2's Conv1D
                    and isinstance(getattr(m, "bias", None), Tensor)] + [(get_module(blk, p), norm, True) for p in paths]
            tl += [(f"blocks.{l}.attn.hook_pattern", pattern)] + self._mlp_rule(l, B, nb)
        return raw, tl

    def _mlp_rule(self, l:int, B:int, nb:int)->list:
        "P11's MLP rule at the down projection's input: irrel' = f(irrel), rel' = f(rel + irrel) - f(irrel) (exactly 0 when rel is)"
        f, st, gated = _act(get_module(self.blks[l], self.spec.mlp)), {}, self.dims.gated
        def keep(k): return lambda act, hook: st.__setitem__(k, (act[B:B + nb], act[B + nb:]))
        def post(act, hook):
            (gr, gi), (ur, ui) = st.pop("g"), (st.pop("u") if gated else (0, 1))   # not gated: f(g) * 1
            fi = f(gi) * ui
            new = act.clone(); new[B + nb:] = fi.to(act); new[B:B + nb] = (f(gr + gi) * (ur + ui) - fi).to(act)
            return new
        return ([(f"blocks.{l}.mlp.hook_pre", keep("g"))] + [(f"blocks.{l}.mlp.hook_pre_linear", keep("u"))] * gated
                + [(f"blocks.{l}.mlp.hook_post", post)])

    @torch.no_grad()
    def run(self, start:int, rel:Tensor, irrel:Tensor, K:int, fns=(), keep:bool=False)->tuple[Tensor, list]:
        "Final hidden states `[R pos d_model]` of rows `[full | rel | irrel]` entering block `start` as given, and (with `keep`) every block's output"
        n, h = 1 + 2 * K, torch.cat([self.resid_pre(start), rel, irrel])
        (raw, tl), handles, outs = self._rules(start, K), [], []
        try:   # raw hooks first: a biased projection's output is corrected before the TL hooks on it read it
            for m, fn, kw in raw: handles.append(m.register_forward_hook(fn, with_kwargs=kw))
            with hooks(self.model, tl + list(fns)):
                for l in range(start, len(self.blks)):
                    args, kwargs = self.calls[l]
                    args, kwargs = _with_in(_rep(args, self.B, n), {k: _rep(v, self.B, n) for k, v in kwargs.items()}, h)
                    o = self.blks[l](*args, **kwargs)
                    h = o[0] if isinstance(o, tuple) else o
                    if self.stabilise: h = torch.cat([h[:self.B], *_stabilise(h[self.B:self.B + K * self.B], h[self.B + K * self.B:])])
                    if keep: outs.append(h)
        finally:
            for hd in handles: hd.remove()
        return h, outs

def _head_source(B:int, K:int, heads:list, P):
    "Hook on `attn.hook_z`: for each `(k, h)`, source k's rel rows take the full row's head h, its irrel rows lose it"
    def f(act, hook):
        new = act.clone()
        for k, h in heads:
            r, ir = slice(B + k * B, B + (k + 1) * B), slice(B + (K + k) * B, B + (K + k + 1) * B)
            new[r, P, h] = act[:B, P, h]; new[ir, P, h] = 0
        return new
    return f


def reference_split(model, ids, heads, P=slice(None), stabilise=True):
    "rel, irrel `[batch layer pos d_model]` at every hook_resid_post from block `heads[0][0]` on, heads = [(l, h)]"
    eng = ReferenceEngine(model, {"input_ids": ids}, stabilise)
    start, B = heads[0][0], ids.shape[0]
    h0 = eng.resid_pre(start)
    fns = [(f"blocks.{l}.attn.hook_z", _head_source(B, 1, [(0, h) for l2, h in heads if l2 == l], P)) for l in sorted({l for l, _ in heads})]
    _, outs = eng.run(start, torch.zeros_like(h0), h0, 1, fns, keep=True)
    return torch.stack([o[B:2 * B] for o in outs], 1), torch.stack([o[2 * B:] for o in outs], 1)
