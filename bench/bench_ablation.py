"""Head-ablation importance of all 270 heads of SmolLM2 (zero ablation; loss and KL), side by side in one process.

Contestants: the previous implementation (one forward per layer's chunk of heads, every block recomputed,
log-softmax per head; kept here verbatim as the baseline), today's exact `ablation_scores` (blocks before the
first ablated layer replayed, chunks across layers, logsumexp-only scores) in float32, and the same under bf16
autocast. Also: the spread between two samples of text (exact, seeds 1 and 2), the yardstick for bf16's error.

    .venv/bin/python bench/bench_ablation.py                # ~4 min on 2 quiet cores
"""
import argparse, json, time, platform
import torch
from headscope.models import load_model
from headscope.data.needles import text_tokens
from headscope.arch import model_dims
from headscope.hooking import hooks, forward
from headscope.heads.causal import ablation_scores, _nll

def previous_ablation(model, ids, max_rows=16):
    "The implementation before this change (zero mode), as the baseline"
    L, H, B = model_dims(model).n_layers, model_dims(model).n_heads, len(ids)
    with torch.no_grad(): clean_loss, clean_lp = _nll(forward(model, {"input_ids": ids}).logits, ids)
    per, out = max(1, max_rows // B), {k: torch.zeros(L, H) for k in ("loss_zero", "kl_zero")}
    for l in range(L):
        for h0 in range(0, H, per):
            hs = list(range(h0, min(h0 + per, H)))
            def knock(z, hook, hs=hs):
                z = z.clone().view(len(hs), B, *z.shape[1:])
                for i, h in enumerate(hs): z[i, :, :, h] = 0
                return z.view(-1, *z.shape[2:])
            x = {"input_ids": ids.repeat(len(hs), 1)}
            with torch.no_grad(), hooks(model, [(f"blocks.{l}.attn.hook_z", knock)]):
                loss, lp = _nll(forward(model, x).logits, x["input_ids"])
            loss, lp = loss.view(len(hs), B, -1), lp.view(len(hs), B, *lp.shape[1:])
            kl = (clean_lp.exp()[None] * (clean_lp[None] - lp)).sum(-1)
            for i, h in enumerate(hs):
                out["loss_zero"][l, h] = float((loss[i] - clean_loss).mean()); out["kl_zero"][l, h] = float(kl[i].mean())
    return out

def spearman(a, b):
    r = lambda v: v.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([r(a), r(b)]))[0, 1])

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("--rows", type=int, default=2); ap.add_argument("--len", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model = load_model(); tok = model.tokenizer
    ids, ids2 = text_tokens(tok, a.rows, a.len, seed=1), text_tokens(tok, a.rows, a.len, seed=2)
    with torch.no_grad(): model(ids[:1, :8])
    runs = {}
    def run(name, f):
        t0 = time.perf_counter(); r = f(); runs[name] = (time.perf_counter() - t0, r); print(f"{name:32s} {runs[name][0]:6.1f} s", flush=True)
    run("previous (per layer, full forwards)", lambda: previous_ablation(model, ids))
    run("exact float32 (default)", lambda: ablation_scores(model, ids, modes=("zero",), progress=False))
    run("bfloat16 autocast", lambda: ablation_scores(model, ids, modes=("zero",), dtype=torch.bfloat16, progress=False))
    run("exact float32, other text (seed 2)", lambda: ablation_scores(model, ids2, modes=("zero",), progress=False))
    base_t, base = runs["previous (per layer, full forwards)"]
    print(f"\n{a.rows} x {a.len} tokens, SmolLM2-135M-Instruct, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'contestant':36s} {'s':>6s} {'x prev':>7s} | {'score':8s} {'max|diff|':>9s} {'max|ref|':>8s} {'spearman':>8s} {'kl>=0.05 agree':>14s}")
    rows = []
    for name, (t, r) in runs.items():
        for k in ("loss_zero", "kl_zero"):
            d = float((r[k] - base[k]).abs().max()); agree = int(((r[k] >= 0.05) == (base["kl_zero"] >= 0.05)).sum()) if k == "kl_zero" else None
            print(f"{name:36s} {t:6.1f} {base_t / t:6.2f}x | {k:8s} {d:9.2e} {float(base[k].abs().max()):8.3f} {spearman(r[k], base[k]):8.4f} {'' if agree is None else f'{agree}/270':>14s}")
            rows.append(dict(contestant=name, seconds=t, speedup=base_t / t, score=k, max_abs_diff=d, spearman=spearman(r[k], base[k]), kl_role_agree=agree))
    print("BENCH_JSON " + json.dumps(rows))
