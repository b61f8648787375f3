#!/usr/bin/env python
"""SAE training speed and memory: headscope's `train_sae` against SAELens' `SAETrainer`, same activations, same SAE.

    bash bench/setup_saelens.sh                                   # once; idempotent
    bench/.venvs/saelens/bin/python bench/bench_sae.py            # TopK 576 -> 4608, k 32, 2 threads, 2^16 real tokens
    bench/.venvs/saelens/bin/python bench/bench_sae.py --arch standard
    bench/.venvs/saelens/bin/python bench/bench_sae.py --synthetic --steps 8 --repeats 1   # quick check, no model

1. Activations are cached once: SmolLM2 `blocks.6.hook_resid_post` over `python_docs_corpus()` through headscope's
   `cache_activations` (bench/.cache/sae_acts/..., reused), or Gaussian-ish synthetic data with `--synthetic`.
   `--tokens` rows are trained on, the next `--eval-tokens` rows are held out for the final MSE / FVU / L0.
2. Each contestant runs in a fresh interpreter (`--child NAME`; this parent never imports torch, so no peak leaks
   into a child's `ru_maxrss`), loads the same rows into one fp32 tensor, warms up on a throwaway SAE, then trains a
   fresh SAE for `--steps` steps of `--batch-size` rows, constant lr 3e-4, no warm-up, Adam:
   - headscope: `train_sae(sae, X, n_tokens=steps*batch, batch_size=batch, lr=3e-4, lr_decay=0, progress=False)`;
   - SAELens: `SAETrainer(SAETrainerConfig(...), TopKTrainingSAE | StandardTrainingSAE, data_provider).fit()`, with
     an iterator of shuffled batches of the same tensor (its `DataProvider`: SAELens' documented seam for
     activations that do not come from its own model-driven store); `saelens-sparse` is the same with
     `use_sparse_activations=True` (a COO tensor and `torch.sparse.mm` in the decoder).
3. Reported per contestant: tokens/s (median over repeats; the repeats alternate contestants), the peak RSS growth
   during warm-up + training over the RSS once the data are loaded (`VmHWM`, reset through /proc/self/clear_refs),
   the held-out MSE (sum over d_in, mean over rows), FVU and L0, and the achieved FLOP rate against the machine's
   fp32 GEMM rate ([4096 576] x [576 4608], same threads, the best of N in a child of its own and of 10 more at the
   start of every contestant's child, since a shared machine only ever slows it): `enc`: the dense encoder alone,
   3 x 2 x d_in x d_sae FLOPs per token (forward, grad W_enc, grad of the input through b_dec), the floor every
   contestant pays; `all`: plus that contestant's decoder, 3 x 2 x d_sae x d_in dense or 3 x 2 x k x d_in sparse.
Settings that differ from either library's default, to make the SAEs the same: SAELens TopK
`rescale_acts_by_decoder_norm=False` (headscope's TopK does not rescale), headscope `lr_decay=0` (SAELens' default
schedule is constant), and SAELens' b_dec starts at the first batch's geometric median as headscope's does
(`--saelens-b-dec zeros` for SAELens' own start; from 0, with Adam at lr 3e-4, it needs far more steps to learn the
mean of SmolLM2's residual stream, whose norm is ~100). Otherwise each keeps its own initialisation (SAELens: decoder
rows of norm 0.1; headscope: unit rows, renormalised after each step) and its own dead-latent rules; a short run has
no dead latents in either, so AuxK never runs.
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "sae_acts"
HOOK = "blocks.6.hook_resid_post"
WAIT = 30.0   # --wait: seconds at most to wait for a quiet machine before each run

# ---------------------------------------------------------------- process helpers (no torch in the parent)
def _status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f: f.write("5")   # resets VmHWM to the current RSS

def _running():
    try:
        with open("/proc/stat") as f: return next(int(l.split()[1]) for l in f if l.startswith("procs_running"))
    except (OSError, StopIteration): return 1

def wait_quiet(limit=30.0):
    "Wait (at most `limit` s) until nothing else runs for 5 samples in a row; True if it got quiet"
    limit = min(limit, WAIT)
    t0, ok = time.perf_counter(), 0
    while ok < 5 and time.perf_counter() - t0 < limit:
        ok = ok + 1 if _running() <= 1 else 0
        time.sleep(0.05)
    return ok >= 5

def _loadavg(): return open("/proc/loadavg").read().split()[:3]

# ---------------------------------------------------------------- children (these import torch)
def data_dir(a):
    n = a.tokens + a.eval_tokens
    return CACHE / (f"synthetic-{a.d_in}-{n}" if a.synthetic else f"smollm2-{HOOK}-{n}")

def make_cache(a):
    "Write the activations once; later runs reuse the folder"
    import numpy as np, torch
    d, n = data_dir(a), a.tokens + a.eval_tokens
    if a.synthetic:
        if (d / "x.npy").exists(): return
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        D = torch.randn(4 * a.d_sae, a.d_in, generator=g); D /= D.norm(dim=-1, keepdim=True)
        rows = []
        for i in range(0, n, 4096):   # each row: 32 of 4*d_sae random directions with exponential weights, plus noise
            m = min(4096, n - i)
            idx = torch.randint(0, len(D), (m, 32), generator=g)
            w = torch.empty(m, 32).exponential_(generator=g)
            rows.append(torch.einsum("mk,mkd->md", w, D[idx]) + 0.05 * torch.randn(m, a.d_in, generator=g))
        np.save(d / "x.npy", torch.cat(rows).numpy())
        return
    from headscope.models import load_model
    from headscope.data.corpora import python_docs_corpus
    from headscope.sae.activations import cache_activations
    torch.set_num_threads(a.threads)
    m = load_model()
    cache_activations(dict(model=m, hook_name=HOOK, corpus=python_docs_corpus(), seq_len=128, batch_size=8),
                      d, n_tokens=n, progress=False)

def load_data(a):
    import numpy as np, torch
    d, n = data_dir(a), a.tokens + a.eval_tokens
    if a.synthetic: X = torch.from_numpy(np.load(d / "x.npy"))
    else:
        from headscope.sae.activations import DiskActivations
        X = DiskActivations(d).read(np.arange(n)).float()
    X = X.contiguous().clone()
    return X[:a.tokens], X[a.tokens:]

def gemm_rate(a):
    "fp32 GEMM [4096 d_in] x [d_in d_sae], best of N, FLOP/s"
    import torch
    torch.set_num_threads(a.threads)
    A, B = torch.randn(a.batch_size, a.d_in), torch.randn(a.d_in, a.d_sae)
    for _ in range(3): A @ B
    best = float("inf")
    for _ in range(a.gemm_repeats):
        t = time.perf_counter(); A @ B; best = min(best, time.perf_counter() - t)
    return 2 * a.batch_size * a.d_in * a.d_sae / best

def _batches(X, bs, seed):
    "SAELens' DataProvider: shuffled batches of X forever, reshuffled each epoch"
    import torch
    g, ep = torch.Generator().manual_seed(seed), 0
    while True:
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(perm) - bs + 1, bs): yield X[perm[i:i + bs]]
        ep += 1

def _hs_train(a, X, steps, seed):
    import torch
    from headscope.sae.core import make_sae
    kw = dict(k=a.k) if a.arch == "topk" else dict(l1_coeff=a.l1)
    sae = make_sae(a.arch, a.d_in, a.d_sae, seed=seed, hook_name=HOOK, **kw)
    from headscope.sae.train import train_sae
    train_sae(sae, X, n_tokens=steps * a.batch_size, batch_size=a.batch_size, lr=3e-4, lr_decay=0.0,
              seed=seed, progress=False)
    sae.impl = "headscope train_sae"
    return sae

def _sl_train(a, X, steps, seed, sparse):
    import torch, sae_lens
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    torch.manual_seed(seed)
    if a.arch == "topk":
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, use_sparse_activations=sparse,
                                                    rescale_acts_by_decoder_norm=False))
    else:
        from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l1_coefficient=a.l1))
    if a.saelens_b_dec == "median":   # SAELens 6.54 has no b_dec initialisation (it starts at 0); headscope's default
        from headscope.sae.core import geometric_median
        with torch.no_grad(): sae.b_dec.copy_(geometric_median(next(_batches(X, a.batch_size, seed))))
    cfg = SAETrainerConfig(total_training_samples=steps * a.batch_size, train_batch_size_samples=a.batch_size,
                           lr=3e-4, lr_end=3e-4, device="cpu")
    SAETrainer(cfg, sae, _batches(X, a.batch_size, seed)).fit()
    sae.impl = f"sae_lens {sae_lens.__version__} SAETrainer"
    return sae

def child(a):
    import gc, torch
    torch.set_num_threads(a.threads)
    os.environ["TQDM_DISABLE"] = "1"
    a.gemm_repeats = 10; g = gemm_rate(a)   # each child measures it too; the best of all measures is used
    X, Xe = load_data(a)
    if a.child == "headscope": import headscope.sae.train   # imports before the baseline: sae_lens alone is ~100s of MiB
    else: import sae_lens, sae_lens.config
    gc.collect(); rss0 = _status("VmRSS:"); _reset_hwm()
    train = {"headscope": lambda s, seed: _hs_train(a, X, s, seed),
             "saelens": lambda s, seed: _sl_train(a, X, s, seed, False),
             "saelens-sparse": lambda s, seed: _sl_train(a, X, s, seed, True)}[a.child]
    if a.warmup: train(a.warmup, 1); gc.collect()
    t = time.perf_counter(); sae = train(a.steps, 0); wall = time.perf_counter() - t
    peak = _status("VmHWM:") - rss0
    sae.eval()
    with torch.no_grad():
        if a.child == "headscope": f = sae.encode(Xe); r = sae.decode(f)
        else:
            f = sae.encode(Xe); f = f.to_dense() if f.is_sparse else f; r = sae.decode(f)
        mse = (r - Xe).pow(2).sum(-1).mean().item()
        fvu = ((r - Xe).pow(2).sum() / (Xe - Xe.mean(0)).pow(2).sum()).item()
        l0 = (f != 0).float().sum(-1).mean().item()
    print("CHILD_JSON " + json.dumps(dict(name=a.child, impl=sae.impl, wall=wall, tok_s=a.steps * a.batch_size / wall,
                                          peak=peak, rss0=rss0, mse=mse, fvu=fvu, l0=l0, gemm=g)), flush=True)

# ---------------------------------------------------------------- parent
def run_child(a, extra):
    cmd = [sys.executable, __file__, *sys.argv[1:], *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TQDM_DISABLE="1",
               PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")   # not the repo root: kernels/ shadows
    lines = [l for l in p.stdout.splitlines() if l.startswith("CHILD_JSON ")]
    if p.returncode or not lines:
        sys.exit(f"child {extra} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return json.loads(lines[-1][len("CHILD_JSON "):])

def main(a):
    names = ["headscope", "saelens"] + (["saelens-sparse"] if a.arch == "topk" and not a.no_sparse else [])
    if a.only: names = [n for n in names if n in a.only]
    print(f"load before: {' '.join(_loadavg())}  (uptime load averages 1/5/15 min; {os.cpu_count()} cpus)", flush=True)
    t = time.perf_counter(); run_child(a, ["--make-cache"])
    print(f"activations: {data_dir(a)} ({a.tokens:,} train + {a.eval_tokens:,} held out, d_in {a.d_in}; "
          f"{time.perf_counter() - t:.0f} s incl. a cached check)", flush=True)
    wait_quiet(); g = run_child(a, ["--gemm"])["gemm"]
    print(f"fp32 GEMM [{a.batch_size} {a.d_in}]x[{a.d_in} {a.d_sae}], {a.threads} threads, best of {a.gemm_repeats}: "
          f"{g / 1e9:.1f} GFLOP/s", flush=True)
    res, quiet = {n: [] for n in names}, 0
    for r in range(a.repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            quiet += wait_quiet()
            out = run_child(a, ["--child", n]); res[n].append(out)
            print(f"  round {r}: {n:15s} {out['tok_s']:9,.0f} tok/s  wall {out['wall']:6.1f} s  peak RSS+ "
                  f"{out['peak'] / 2**20:6.0f} MiB  load {' '.join(_loadavg())}", flush=True)
    g = max([g] + [o["gemm"] for rs in res.values() for o in rs])   # the least disturbed GEMM measure
    enc = 3 * 2 * a.d_in * a.d_sae
    dec = lambda n: 3 * 2 * (a.k if (a.arch == "topk" and n != "saelens") else a.d_sae) * a.d_in
    base = statistics.median(o["tok_s"] for o in res["saelens"]) if "saelens" in res else None
    best = max(o["tok_s"] for o in res["saelens"]) if "saelens" in res else None
    print(f"\n== {a.arch} SAE d_in {a.d_in} d_sae {a.d_sae}" + (f" k {a.k}" if a.arch == "topk" else f" l1 {a.l1}") +
          f", batch {a.batch_size}, {a.steps} steps (+{a.warmup} warm-up), {a.threads} threads, "
          f"{'synthetic' if a.synthetic else 'SmolLM2 ' + HOOK} ==")
    hdr = (f"{'contestant':16s} {'tok/s med':>10s} {'min-max':>15s} {'x SAELens':>9s} {'best x':>6s} {'peak RSS+':>9s} "
           f"{'enc frac':>8s} {'all frac':>8s} {'mse':>8s} {'fvu':>6s} {'L0':>6s}  implementation")
    print(hdr); print("-" * len(hdr))
    summary = {}
    for n in names:
        ts = [o["tok_s"] for o in res[n]]; m = statistics.median(ts); last = res[n][-1]
        peak = max(o["peak"] for o in res[n])
        summary[n] = dict(tok_s=m, tok_s_all=ts, x_saelens=m / base if base else None, best_x_saelens=max(ts) / best if best else None, peak_mib=peak / 2**20, enc_frac=m * enc / g, all_frac=m * (enc + dec(n)) / g,
                          mse=last["mse"], fvu=last["fvu"], l0=last["l0"], impl=last["impl"])
        s = summary[n]
        print(f"{n:16s} {m:10,.0f} {min(ts):7,.0f}-{max(ts):<7,.0f} {(m / base if base else float('nan')):9.2f} {(max(ts) / best if best else float('nan')):6.2f} "
              f"{s['peak_mib']:7.0f}Mi {s['enc_frac']:8.2f} {s['all_frac']:8.2f} {s['mse']:8.3g} {s['fvu']:6.3f} "
              f"{s['l0']:6.1f}  {s['impl']}")
    print(f"peak RSS+: max over repeats of the peak resident growth over the RSS once the data are loaded "
          f"({res[names[0]][0]['rss0'] / 2**20:.0f} MiB); enc/all frac: achieved FLOP rate / fp32 GEMM rate "
          f"({g / 1e9:.1f} GFLOP/s, best over the parent's and each child's measures), counting the dense encoder ({enc / 1e6:.1f} MFLOP/token) / plus the decoder "
          f"(dense {3 * 2 * a.d_sae * a.d_in / 1e6:.1f}, sparse {3 * 2 * (a.k or 0) * a.d_in / 1e6:.2f} MFLOP/token); "
          f"mse/fvu/L0 on {a.eval_tokens:,} held-out rows after training (last repeat); x SAELens: median over median, "
          f"best x: best over best (the least disturbed runs on a shared machine).")
    print(f"{quiet}/{a.repeats * len(names)} runs started on a quiet machine; load after: {' '.join(_loadavg())}")
    out = dict(arch=a.arch, d_in=a.d_in, d_sae=a.d_sae, k=a.k, steps=a.steps, batch=a.batch_size, threads=a.threads,
               synthetic=a.synthetic, gemm_gflops=g / 1e9, quiet_runs=f"{quiet}/{a.repeats * len(names)}",
               when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_after=_loadavg(), results=summary)
    print("BENCH_JSON " + json.dumps(out))
    rp = HERE / "results" / "bench_sae.json"   # merged: one entry per arch and data kind
    allr = json.loads(rp.read_text()) if rp.exists() else {}
    allr[f"{a.arch}{'-synthetic' if a.synthetic else ''}"] = out
    rp.parent.mkdir(exist_ok=True); rp.write_text(json.dumps(allr, indent=1))

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["topk", "standard"], default="topk")
    ap.add_argument("--d-in", type=int, default=576); ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32); ap.add_argument("--l1", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32, help="timed training steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps on a throwaway SAE first, same process")
    ap.add_argument("--tokens", type=int, default=2**16, help="cached activations trained on")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="more cached activations, held out")
    ap.add_argument("--synthetic", action="store_true", help="random activations instead of SmolLM2's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs per contestant, alternating")
    ap.add_argument("--gemm-repeats", type=int, default=20)
    ap.add_argument("--no-sparse", action="store_true", help="skip SAELens with use_sparse_activations=True")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds at most to wait for a quiet machine per run")
    ap.add_argument("--saelens-b-dec", choices=["median", "zeros"], default="median",
                    help="SAELens' b_dec before training: the first batch's geometric median, as headscope's default "
                         "(computed outside its timed fit), or SAELens' own zeros")
    ap.add_argument("--only", nargs="*", help="contestants to run")
    ap.add_argument("--child", help=argparse.SUPPRESS); ap.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--make-cache", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.arch == "standard": a.k = None
    return a

if __name__ == "__main__":
    a = parse()
    if a.make_cache: make_cache(a); print("CHILD_JSON {}")
    elif a.gemm: print("CHILD_JSON " + json.dumps(dict(gemm=gemm_rate(a))))
    elif a.child: child(a)
    else: WAIT = a.wait; main(a)
