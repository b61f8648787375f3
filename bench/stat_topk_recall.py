"""How good is the statistical top-k (`headscope.kernels.stat_threshold`) as an approximate top-k? (CPU; not CI.)

`OMP_NUM_THREADS=1 python bench/stat_topk_recall.py` prints the tables and writes bench/results/stat_topk_recall.md.

θ = μ + σ·Φ⁻¹(1 − k/d) per row keeps `x > θ`. For each set of rows it reports
- recall@k: |kept ∩ exact top-k| / k, averaged over rows;
- the number kept per row relative to k: mean, median, p10, p90;
- the same after a ReLU (what an SAE uses): only positive values count, in both sets (recall over rows whose
  top-k has a positive value, divided by the number of positive values in the top-k).

Rows: (1) Gaussian, n 4096, d 4608 and 16384, k 32 and 64; (2) real pre-activations `sae.pre(x)` of a TopK SAE
(d_sae 4608, k 32) trained for about a minute on SmolLM2-135M's `blocks.6.hook_resid_post` (python docs +
stdlib text, 2^16 activations), on held-out stdlib text; with their excess kurtosis and the nominal k' that makes
the mean kept count equal 32.
"""
import os, time, statistics, tempfile
from pathlib import Path
import torch
from headscope.kernels.stat_threshold import stat_topk, gaussian_quantile

OUT = Path(__file__).resolve().parent / "results" / "stat_topk_recall.md"
N_TOKENS, N_HELD, EPOCHS, D_SAE, K = 2**16, 8192, 2, 4608, 32

def recall_kept(h, k, theta=None, relu=False):
    "recall@k and kept-count statistics of `h > theta` (theta: stat_topk's for `k` when None) against the exact top-k"
    if theta is None: theta = stat_topk(h, k)[1]
    kept = h > theta[:, None]
    top = torch.zeros_like(kept).scatter_(-1, h.topk(k, dim=-1).indices, True)
    if relu: kept, top = kept & (h > 0), top & (h > 0)
    n_top = top.sum(-1)
    rows = n_top > 0
    rec = ((kept & top).sum(-1)[rows] / n_top[rows]).double()
    c = kept.sum(-1).double() / k
    q = torch.quantile(c, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return dict(recall=rec.mean().item(), kept_mean=c.mean().item(), kept_median=q[1].item(), kept_p10=q[0].item(),
                kept_p90=q[2].item(), kept_abs=c.mean().item() * k, rows=int(rows.sum()))

def kurtosis(h):
    "Excess kurtosis of each row (float64): E[(x−μ)⁴]/σ⁴ − 3, 0 for a Gaussian"
    x = h.double()
    dev = x - x.mean(-1, keepdim=True)
    return (dev.pow(4).mean(-1) / dev.pow(2).mean(-1).pow(2) - 3)

def skewness(h):
    "Skewness of each row (float64): E[(x−μ)³]/σ³, 0 for a Gaussian"
    x = h.double()
    dev = x - x.mean(-1, keepdim=True)
    return dev.pow(3).mean(-1) / dev.pow(2).mean(-1).pow(1.5)

def row(name, r, k):
    return (f"| {name} | {k} | {r['recall']:.3f} | {r['kept_mean']:.2f} ({r['kept_abs']:.1f}) | {r['kept_median']:.2f} | "
            f"{r['kept_p10']:.2f} | {r['kept_p90']:.2f} |")

HEAD = ("| rows | k | recall@k | kept/k mean (count) | kept/k median | p10 | p90 |\n"
        "|---|---|---|---|---|---|---|")

def gaussian_part(lines):
    lines += ["## Gaussian rows (n 4096, torch.randn)", "", HEAD]
    for d in (4608, 16384):
        h = torch.randn(4096, d, generator=torch.Generator().manual_seed(d))
        for k in (32, 64):
            for relu in (False, True):
                lines.append(row(f"d {d}{' + ReLU' if relu else ''}", recall_kept(h, k, relu=relu), k))
                print(lines[-1], flush=True)
    lines += ["", "On Gaussian rows the threshold keeps k on average; the recall is below 1 only because the count varies "
              "from row to row (a row that keeps fewer than k misses some of its top-k; a threshold never keeps a "
              "smaller value while dropping a larger one).", ""]

def sae_part(lines):
    from headscope.models import load_model
    from headscope.sae.core import make_sae
    from headscope.data.corpora import python_docs_corpus, stdlib_corpus
    from headscope.sae.activations import ActivationStore, cache_activations
    from headscope.sae.train import train_sae
    torch.manual_seed(0)
    model, hook = load_model(), "blocks.6.hook_resid_post"
    files = stdlib_corpus()
    held_out, train_text = files[::20], python_docs_corpus() + [t for i, t in enumerate(files) if i % 20]
    folder = tempfile.mkdtemp(prefix="hs_stat_topk_")
    t0 = time.time()
    acts = cache_activations(ActivationStore(model, hook, train_text, seq_len=128, batch_size=16), f"{folder}/acts",
                             n_tokens=N_TOKENS, progress=False)
    held = cache_activations(ActivationStore(model, hook, held_out, seq_len=128, batch_size=16), f"{folder}/held",
                             n_tokens=N_HELD, progress=False)
    t_cache = time.time() - t0
    sae = make_sae("topk", d_in=576, d_sae=D_SAE, k=K, seed=0, hook_name=hook, dead_tokens=len(acts) // 2)
    t0 = time.time()
    log = train_sae(sae, acts, n_tokens=EPOCHS * len(acts), batch_size=1024, lr=1e-3, lr_warmup=20, progress=False)
    t_train, last = time.time() - t0, log.history[-1]
    print(f"cached {len(acts)} + {len(held)} activations in {t_cache:.0f} s; trained {EPOCHS * len(acts)} tokens in "
          f"{t_train:.0f} s: fvu {last['fvu']:.3f}, dead {last['dead_frac']:.3f}", flush=True)
    x = held.read(torch.arange(len(held)).numpy())
    with torch.no_grad():
        h = sae.pre(x).float()
        h0 = make_sae("topk", d_in=576, d_sae=D_SAE, k=K, seed=0).pre(x).float()   # the same SAE untrained: random unit directions
    ku, sk = kurtosis(h), skewness(h)
    var, mu = torch.var_mean(h, dim=-1, correction=0)
    sd = var.sqrt()
    lines += [f"## SmolLM2 TopK SAE pre-activations (d_sae {D_SAE}, k {K})", "",
              f"SAE: `make_sae('topk', d_in=576, d_sae={D_SAE}, k={K})` trained with `train_sae` on {len(acts):,} activations "
              f"of `{hook}` (python docs + stdlib, {EPOCHS} epochs, {t_train:.0f} s on the CPU; final FVU {last['fvu']:.3f}, "
              f"dead fraction {last['dead_frac']:.3f}); rows: `sae.pre(x)` on {len(held):,} held-out activations "
              f"(every 20th stdlib file).", "",
              f"Rows' excess kurtosis (0 for a Gaussian): mean {ku.mean():.1f}, median {ku.median():.1f}, "
              f"p10 {ku.quantile(0.1):.1f}, p90 {ku.quantile(0.9):.1f}; skewness: median {sk.median():.2f}, p10 "
              f"{sk.quantile(0.1):.2f}, p90 {sk.quantile(0.9):.2f}. Row mean μ: median {mu.median():.3f}; "
              f"row std σ: median {sd.median():.3f}; fraction of values > 0: {(h > 0).float().mean():.3f}.", "", HEAD]
    for relu in (False, True):
        lines.append(row(f"SAE pre-acts{' + ReLU' if relu else ''}, nominal k={K}", recall_kept(h, K, relu=relu), K))
        print(lines[-1], flush=True)
    ku0 = kurtosis(h0)
    for relu in (False, True):
        lines.append(row(f"untrained SAE (same init) pre-acts{' + ReLU' if relu else ''}, nominal k={K}", recall_kept(h0, K, relu=relu), K))
        print(lines[-1], flush=True)
    # the nominal k' whose mean kept count is K: integers, then a bisection on the quantile z itself
    d = h.shape[-1]
    counts = {kk: (h > (mu + sd * gaussian_quantile(kk, d))[:, None]).sum(-1).double().mean().item() for kk in range(1, 4 * K + 1)}
    kk = min(counts, key=lambda c: abs(counts[c] - K))
    lo, hi = 0., 30.                                       # kept count falls as z grows; z = 0 keeps about half
    for _ in range(60):
        z = (lo + hi) / 2
        if (h > (mu + sd * z)[:, None]).sum(-1).double().mean().item() > K: lo = z
        else: hi = z
    k_real = d * (1 - statistics.NormalDist().cdf(z))
    theta_z = mu + sd * z
    for relu in (False, True):
        lines.append(row(f"SAE pre-acts{' + ReLU' if relu else ''}, nominal k'={kk}", recall_kept(h, K, theta=stat_topk(h, kk)[1], relu=relu), K))
        print(lines[-1], flush=True)
        lines.append(row(f"SAE pre-acts{' + ReLU' if relu else ''}, z={z:.3f} (k'={k_real:.2f})", recall_kept(h, K, theta=theta_z, relu=relu), K))
        print(lines[-1], flush=True)
    lines += ["", f"θ > 0 on every row ({(mu + sd * gaussian_quantile(K, d) > 0).float().mean():.3f} of rows), so the ReLU "
              "changes nothing at nominal k. The untrained SAE (random unit encoder rows) has row kurtosis median "
              f"{ku0.median():.1f}.", "",
              f"Mean kept count for the integer nominal k' = 1..{4 * K}: "
              + ", ".join(f"{c}: {v:.1f}" for c, v in counts.items()) + ".", "",
              f"The k' that keeps {K} on average is {k_real:.2f} (z = Φ⁻¹(1 − k'/d) = {z:.3f} instead of "
              f"{gaussian_quantile(K, d):.3f}); the nearest integer k' is {kk} (mean kept {counts[kk]:.1f}).", ""]

def main():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.time()
    lines = ["# stat_topk: recall against exact top-k and the number kept", "",
             "Made by `OMP_NUM_THREADS=1 python bench/stat_topk_recall.py` (CPU, the torch reference of "
             "`headscope.kernels.stat_threshold`). θ = μ + σ·Φ⁻¹(1 − k/d) per row, keep `x > θ`. recall@k = |kept ∩ "
             "top-k| / k averaged over rows; kept/k: the kept count per row over k. '+ ReLU': only positive values "
             "count in both sets (recall over the positive top-k values).", ""]
    gaussian_part(lines)
    sae_part(lines)
    lines += [f"Total run time {time.time() - t0:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} thread(s)."]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {OUT}")

if __name__ == "__main__": main()
