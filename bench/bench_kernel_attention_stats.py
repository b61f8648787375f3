"""Attention with per-head statistics: the Triton kernel against the chunked torch path, SDPA and an eager pattern.

    python bench/bench_kernel_attention_stats.py --capture     # here (CPU): SmolLM2's own q/k/v -> .devdata/
    python bench/bench_kernel_attention_stats.py               # on a GPU: exactness on those inputs, timings, census

On the GPU it prints, in this order:
1. exactness on real SmolLM2 queries/keys/values (6 layers, census text and repeated-token inputs, captured
   on CPU here with `--capture`): kernel vs the torch reference on the GPU and vs the reference run on the CPU;
2. timings (`triton.testing.do_bench`, median ms) at the census shape (8 x 1024, 9 query heads over 3 KV heads,
   d_head 64) and a long context (1 x 16384): the kernel (statistics only; output + statistics), the chunked
   torch reference, SDPA (output only, no statistics: the speed of light for attention) and an eager pattern
   (what TransformerLens/nnsight need to see attention), with peak memory and the roofline floor;
3. the head census's pattern scores on a randomly initialised SmolLM2-shaped Llama (30 layers, 9/3 heads,
   d_model 576) through both backends: time and the largest score difference.
"""
import argparse, math, os, sys, time
from pathlib import Path
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".devdata" / "smollm2_qkv.pt"
LAYERS = (0, 5, 11, 17, 23, 29)

def capture():
    "CPU: SmolLM2's q/k/v/mask at six layers on census inputs, and the reference statistics computed here"
    from headscope.models import load_model
    from headscope.hooking import hooks
    from headscope.data.needles import text_tokens, repeated_tokens
    from headscope.kernels import attention_with_stats
    model = load_model()
    tok = model.tokenizer
    inputs = {"text": (text_tokens(tok, n_seq=2, seq_len=256), None),
              "repeated": (repeated_tokens(tok, n_seq=2, half=64), None)}
    n = inputs["repeated"][0].shape[1]; T = (n - 1) // 2
    i = torch.arange(n)
    inputs["repeated"] = (inputs["repeated"][0], torch.where(i >= 1 + T, i - (T - 1), -1).expand(2, n).contiguous())
    out = {}
    for name, (ids, tg) in inputs.items():
        got = {}
        def obs(l):
            def f(module, q, k, v, mask, kw): got[l] = (q.contiguous(), k.contiguous(), v.contiguous(), mask, kw.get("scaling"))
            return f
        with torch.no_grad(), hooks(model, observe={l: obs(l) for l in LAYERS}): model(ids)
        for l, (q, k, v, mask, sc) in got.items():
            o, st = attention_with_stats(q, k, v, mask, sc, targets=tg, force="torch")
            out[f"{name}.{l}"] = dict(q=q, k=k, v=v, mask=mask, scaling=sc, targets=tg, out=o, stats=st)
    DATA.parent.mkdir(exist_ok=True)
    torch.save(out, DATA)
    print(f"saved {len(out)} layer inputs to {DATA} ({DATA.stat().st_size / 2**20:.1f} MiB)")

def rel(a, b):
    a, b = a.double(), b.double()
    ok = ~torch.isnan(b)
    return float((a[ok] - b[ok]).norm() / b[ok].norm().clamp_min(1e-30))

def exactness():
    from headscope.kernels import attention_with_stats
    from headscope.kernels.attention_stats import STAT_NAMES
    if not DATA.exists(): print(f"(no {DATA}: run --capture on a CPU machine first)"); return
    data = torch.load(DATA, weights_only=True)
    worst = {n: 0.0 for n in STAT_NAMES}; worst_cpu = dict(worst); worst_out = [0.0, 0.0]; arg_same = [0, 0]
    for key, d in data.items():
        t = {n: (d[n].cuda() if isinstance(d[n], torch.Tensor) else d[n]) for n in ("q", "k", "v", "mask", "targets")}
        args = (t["q"], t["k"], t["v"], t["mask"], d["scaling"], None, t["targets"])
        o_ref, ref = attention_with_stats(*args, force="torch")
        o, st = attention_with_stats(*args, force="triton")
        for n in STAT_NAMES:
            if n == "argmax":
                arg_same[0] += int((st[n] == ref[n]).sum()); arg_same[1] += st[n].numel()
                continue
            worst[n] = max(worst[n], rel(st[n], ref[n])); worst_cpu[n] = max(worst_cpu[n], rel(st[n].cpu(), d["stats"][n]))
        worst_out[0] = max(worst_out[0], rel(o, o_ref)); worst_out[1] = max(worst_out[1], rel(o.cpu(), d["out"]))
    print(f"\n## 1. Exactness on SmolLM2 q/k/v ({len(data)} layer inputs; relative L2 error, worst over inputs)")
    print("| statistic | kernel vs torch on GPU | kernel vs torch on CPU |")
    print("|---|---|---|")
    for n in STAT_NAMES:
        if n != "argmax": print(f"| {n} | {worst[n]:.2e} | {worst_cpu[n]:.2e} |")
    print(f"| output | {worst_out[0]:.2e} | {worst_out[1]:.2e} |")
    print(f"| argmax equal | {arg_same[0]}/{arg_same[1]} | |")

def timings():
    import triton
    from headscope.kernels import attention_with_stats
    print("\n## 2. Timings (median ms, do_bench; peak = extra CUDA memory of one call)")
    print("| shape | dtype | contestant | ms | x kernel(stats) | peak MiB | floor ms |")
    print("|---|---|---|---|---|---|---|")
    for (b, n) in ((8, 1024), (1, 16384)):
        h, kvh, d = 9, 3, 64
        for dt in (torch.float32, torch.bfloat16):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(b, h, n, d, device="cuda", generator=g).to(dt)
            k = torch.randn(b, kvh, n, d, device="cuda", generator=g).to(dt)
            v = torch.randn(b, kvh, n, d, device="cuda", generator=g).to(dt)
            kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
            flops = 2 * 2 * b * h * n * n / 2 * d
            bytes_ = (q.numel() * 2 + k.numel() * 2) * q.element_size() + 11 * 4 * b * h * n
            rate = 60e12 if dt == torch.float32 else 700e12
            floor = max(flops / rate, bytes_ / 4.3e12) * 1e3
            def eager():
                s = (q.float() @ kk.float().transpose(-1, -2)) * d ** -0.5
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), -math.inf)
                A = torch.softmax(s, -1)
                return A @ vv.float(), A[..., 0], -(A * A.clamp_min(1e-30).log()).sum(-1)
            cands = {"kernel: stats": lambda: attention_with_stats(q, k, None, force="triton"),
                     "kernel: out + stats": lambda: attention_with_stats(q, k, v, force="triton"),
                     "torch chunked: stats": lambda: attention_with_stats(q, k, None, force="torch"),
                     "SDPA: out only": lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)}
            if b * h * n * n * 4 * 3 < 40e9: cands["eager pattern: out + 2 stats"] = eager
            res = {}
            for name, fn in cands.items():
                try:
                    fn(); torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
                    fn(); torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    res[name] = (ms, peak)
                except torch.cuda.OutOfMemoryError:
                    res[name] = (float("nan"), float("nan"))
                torch.cuda.empty_cache()
            base_ms = res["kernel: stats"][0]
            for name, (ms, peak) in res.items():
                print(f"| {b}x{n} | {str(dt)[6:]} | {name} | {ms:.3f} | {ms / base_ms:.2f} | {peak:.0f} | {floor:.3f} |")

def sweep():
    "Tile shapes for the kernel at the census shape: time and error against the torch path for each"
    import triton
    import headscope.kernels.attention_stats as A
    from headscope.kernels import attention_with_stats
    print("\n## 2b. Tile sweep at 8 x 1024 (BLOCK_Q, BLOCK_K, warps): median ms, worst relative error vs torch")
    print("| tiles | dtype | stats ms | out+stats ms | worst rel err |")
    print("|---|---|---|---|---|")
    default = A.GPU_TILES
    g = torch.Generator(device="cuda").manual_seed(1)
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(8, 9, 1024, 64, device="cuda", generator=g).to(dt)
        k = torch.randn(8, 3, 1024, 64, device="cuda", generator=g).to(dt)
        v = torch.randn(8, 3, 1024, 64, device="cuda", generator=g).to(dt)
        tg = torch.randint(-1, 1024, (8, 1024), device="cuda", generator=g).minimum(torch.arange(1024, device="cuda"))
        ro, ref = attention_with_stats(q, k, v, targets=tg, force="torch")
        for cfg in ((64, 64, 4), (64, 32, 4), (128, 64, 8), (128, 32, 8), (64, 64, 8), (128, 128, 8)):
            A.GPU_TILES = cfg
            try:
                o, st = attention_with_stats(q, k, v, targets=tg, force="triton")
                err = max([rel(st[n], ref[n]) for n in st if n not in ("argmax", "n_keys")] + [rel(o, ro)])
                t1 = triton.testing.do_bench(lambda: attention_with_stats(q, k, None, targets=tg, force="triton"), warmup=10, rep=50, return_mode="median")
                t2 = triton.testing.do_bench(lambda: attention_with_stats(q, k, v, targets=tg, force="triton"), warmup=10, rep=50, return_mode="median")
                print(f"| {cfg} | {str(dt)[6:]} | {t1:.3f} | {t2:.3f} | {err:.1e} |")
            except Exception as e:
                print(f"| {cfg} | {str(dt)[6:]} | failed: {type(e).__name__}: {str(e)[:80]} | | |")
    A.GPU_TILES = default

def census():
    from headscope.models import tiny_model
    from headscope.heads.patterns import pattern_scores
    from headscope.data.needles import repeated_tokens, text_tokens
    from headscope.kernels import force_backend
    model = tiny_model("llama", n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, seed=0,
                       max_position_embeddings=2048).cuda()
    tok = model.tokenizer
    text, rep = text_tokens(tok, n_seq=16, seq_len=1024), repeated_tokens(tok, n_seq=16, half=256)
    res, secs = {}, {}
    for backend in ("torch", "triton", "torch", "triton"):               # second round timed (compiled, warm)
        with force_backend(backend):
            torch.cuda.synchronize(); t = time.perf_counter()
            res[backend] = pattern_scores(model, text, rep, batch_size=8, progress=False)
            torch.cuda.synchronize(); secs[backend] = time.perf_counter() - t
    diff = max(float((res["triton"][n] - res["torch"][n]).abs().nan_to_num().max()) for n in res["torch"])
    print("\n## 3. Head census pattern scores, SmolLM2-shaped random Llama, 16 x 1024 text + 16 x 513 repeated")
    print(f"torch chunked path {secs['torch']:.2f} s, Triton kernel {secs['triton']:.2f} s "
          f"({secs['torch'] / secs['triton']:.1f}x); largest |score difference| over {len(res['torch'])} scores x 270 heads: {diff:.2e}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capture", action="store_true", help="CPU: save SmolLM2 q/k/v and reference statistics for the GPU run")
    a = ap.parse_args()
    if a.capture: capture(); sys.exit()
    if not torch.cuda.is_available(): sys.exit("This benchmark needs a CUDA GPU (run --capture here instead).")
    print(f"# attention_with_stats on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    exactness(); timings(); sweep(); census()
