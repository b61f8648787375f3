"""Activation patching of every head at the final position, one IOI pair, SmolLM2-135M (fp32, CPU).

Naive (one hooked forward per head) vs batched (all patches stacked along the batch) vs batched with
the corrupted prefix's KV cache reused (only the final token recomputed). Same process, same inputs;
prints times, ratios and the largest difference between the three grids.

    .venv/bin/python bench/bench_patching.py [--repeats 3] [--threads 2]
"""
import argparse, json, time, pathlib, torch

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bench_patching.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from headscope.models import load_model
    from headscope.patching import activation_patching, naive_patching, logit_diff
    m = load_model()
    tk = m.tokenizer
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupt = "When Alice and Bob went to the store, Charlie gave a drink to"
    mary, john = (tk.encode(s, add_special_tokens=False)[0] for s in (" Mary", " John"))
    metric = lambda lg: logit_diff(lg, mary, john)
    runs = {
        "naive loop": lambda: naive_patching(m, clean, corrupt, metric, "z", -1),
        "batched": lambda: activation_patching(m, clean, corrupt, metric, "z", -1, batch_size=270, reuse_prefix=False, progress=False).raw,
        "batched + prefix KV": lambda: activation_patching(m, clean, corrupt, metric, "z", -1, batch_size=270, progress=False).raw,
    }
    times, grids = {}, {}
    for r in range(a.repeats):
        for k, f in runs.items():
            t = time.perf_counter(); grids[k] = f(); times.setdefault(k, []).append(time.perf_counter() - t)
    base = min(times["naive loop"])
    print(f"SmolLM2-135M, 1 IOI pair ({len(tk(clean)['input_ids'])} tokens), 270 heads at the final position, {a.threads} threads, best of {a.repeats}")
    rows = {}
    for k in runs:
        d = float((grids[k] - grids["naive loop"]).abs().max())
        rows[k] = dict(best_s=min(times[k]), all_s=times[k], speedup_vs_naive=base / min(times[k]), max_abs_diff_vs_naive=d)
        print(f"{k:22s} {min(times[k]):7.2f} s   x{base / min(times[k]):6.1f}   max |diff| vs naive {d:.2e}")
    pathlib.Path(a.out).write_text(json.dumps(rows, indent=1))

if __name__ == "__main__": main()
