#!/usr/bin/env python
"""Head census at long context: peak memory and wall time of `pattern_scores` against a full-pattern cache.

For SmolLM2-135M-Instruct (`load_model()`: 30 layers x 9 heads, fp32, SDPA, CPU) on ONE sequence of
512, 2,048 and 4,096 tokens, each configuration runs in a fresh subprocess so peaks do not mix:

- `census`: `pattern_scores(model, text, repeated, batch_size=1)`, all 11 scores, where `text` is
  `text_tokens(tok, 1, n)` (a window of `default_text()`, BOS first) and `repeated` is
  `repeated_tokens(tok, 1, (n-1)//2)` (`[BOS] r_1..r_T r_1..r_T`, n-1 or n tokens).
- `cache`: `run_with_cache(model, ids, names=["blocks.*.attn.hook_pattern"])` on the same two inputs
  in turn (what a TransformerLens-style census holds: every pattern, plus the logits), each cache
  dropped before the next. Run only where `estimate_cache` says the patterns fit in `--max-cache-gib`;
  otherwise its size is printed "(not run: would need X GiB)".

Memory is the kernel's resident high-water mark (`VmHWM` of /proc/self/status, reset after the model
is loaded and has run one 8-token forward, by writing 5 to /proc/self/clear_refs, with a 2 ms RSS
sampler as a cross-check): `peak` is the whole process's peak including the model and the load, `+`
is the growth over the resident size after loading and that warm-up forward (the weights are mmap'ed
from safetensors and count as resident only once read: without the warm-up, `+` would include them). The issue's requirement is checked on the census at 4,096 tokens:
PASS when the process's peak RSS, model included, is at most 4 GiB.

    .venv/bin/python bench/bench_census.py                     # memory runs, ~5 min quiet (~50 on a shared machine)
    .venv/bin/python bench/bench_census.py --sizes 512 2048    # smaller
    .venv/bin/python bench/bench_census.py --timing            # plus census vs cache timed side by side in one process
    .venv/bin/python bench/bench_census.py --timing-only --timing-sizes 512 2048 4096   # re-time, keep the memory rows
    .venv/bin/python bench/bench_census.py --show bench/results/bench_census.json       # print a saved run
    .venv/bin/python bench/bench_census.py --one census:4096   # one configuration, prints CHILD_JSON

Writes bench/results/bench_census.json. Wall times from separate processes are only indicative on a
shared machine; `--timing` gives the same-process ratio."""
import argparse, json, os, pathlib, platform, subprocess, sys, time

HERE = pathlib.Path(__file__).resolve().parent
OUT_JSON = HERE/"results"/"bench_census.json"
MiB, GiB = 2**20, 2**30
LIMIT = 4*GiB                                        # the issue: a 4,096-token census fits in 4 GiB of RAM
PATTERNS = ["blocks.*.attn.hook_pattern"]

def log(*a): print(*a, flush=True)

# ---------------------------------------------------------------------------------------------
# Resident memory of this process, from the kernel
def _status(key)->int:
    "A `kB` field of /proc/self/status (VmRSS, VmHWM), in bytes"
    with open("/proc/self/status") as f:
        return next(int(l.split()[1])*1024 for l in f if l.startswith(key + ":"))

def _reset_hwm()->bool:
    "Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed"
    try:
        with open("/proc/self/clear_refs", "w") as f: f.write("5")
        return True
    except OSError: return False

def _trim():
    try:
        import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError: pass

class Sampler:
    "RSS sampled every `every` s in a thread: a cross-check of VmHWM (it can miss a peak shorter than `every`)"
    def __init__(self, every=0.002): self.every, self.peak, self.done = every, 0, False
    def __enter__(self):
        import threading
        def run():
            while not self.done: self.peak = max(self.peak, _status("VmRSS")); time.sleep(self.every)
        self.th = threading.Thread(target=run, daemon=True); self.th.start(); return self
    def __exit__(self, *a):
        self.done = True; self.th.join(); self.peak = max(self.peak, _status("VmRSS"))

# ---------------------------------------------------------------------------------------------
# One configuration, in its own process
def inputs(tok, n):
    from headscope.data.needles import text_tokens, repeated_tokens
    return text_tokens(tok, 1, n), repeated_tokens(tok, 1, (n - 1)//2)

def one(spec:str, threads:int)->dict:
    "Load the model, run `census:N`, `cache:N` or `load:N` once; the memory and time it took"
    import gc, torch
    kind, n = spec.split(":"); n = int(n)
    torch.set_num_threads(threads)
    rss_start = _status("VmRSS")
    from headscope.models import load_model
    from headscope.heads.patterns import pattern_scores
    from headscope.cache import run_with_cache, estimate_cache
    t = time.perf_counter(); model = load_model(); load_s = time.perf_counter() - t
    tok = model.tokenizer
    text, rep = inputs(tok, n)
    est = {str(dt).removeprefix("torch."): [estimate_cache(model, ids, names=PATTERNS, dtype=dt).nbytes for ids in (text, rep)]
           for dt in (torch.float32, torch.bfloat16)}
    gc.collect(); _trim()
    rss_cold = _status("VmRSS")
    # The weights are mmap'ed from safetensors and become resident only when first read: one short
    # forward pages them all in (~0.5 GiB), so the baseline is the model as it sits after any use.
    from headscope.hooking import forward
    with torch.no_grad(): forward(model, {"input_ids": text[:, :8]}, logits_to_keep=1)
    gc.collect(); _trim()
    hwm_load, rss_loaded = _status("VmHWM"), _status("VmRSS")
    reset = _reset_hwm()
    out = {"spec": spec, "kind": kind, "n": n, "text_len": text.shape[1], "repeated_len": rep.shape[1],
           "threads": torch.get_num_threads(), "load_s": round(load_s, 2), "rss_start": rss_start,
           "rss_cold": rss_cold, "rss_loaded": rss_loaded, "hwm_load": hwm_load, "hwm_reset": reset,
           "pattern_cache_bytes_est": est, "loadavg_start": os.getloadavg()[0]}
    parts = {}
    with Sampler() as smp:
        if kind == "census":
            t = time.perf_counter()
            s = pattern_scores(model, text, rep, batch_size=1, progress=False)
            parts["pattern_scores"] = time.perf_counter() - t
            ind = s["induction"]
            out["induction_max"] = round(float(ind.max()), 4)
            out["induction_top"] = [(i//ind.shape[1], i % ind.shape[1]) for i in ind.flatten().topk(3).indices.tolist()]
            out["all_finite"] = {k: bool(v.isfinite().all()) for k, v in s.items()}
            del s
        elif kind == "cache":
            held = []
            for name, ids in (("text", text), ("repeated", rep)):
                t = time.perf_counter()
                c = run_with_cache(model, ids, names=PATTERNS)
                parts[f"cache_{name}"] = time.perf_counter() - t
                held.append({"patterns": sum(c[k].numel()*c[k].element_size() for k in c.keys()),
                             "logits": c.logits.numel()*c.logits.element_size(), "n_patterns": len(list(c.keys()))})
                del c; gc.collect(); _trim()
            out["cache_bytes"] = held
        elif kind != "load": raise SystemExit(f"unknown configuration {spec!r}: census:N, cache:N or load:N")
    hwm_run = _status("VmHWM")
    out.update(parts_s={k: round(v, 2) for k, v in parts.items()}, wall_s=round(sum(parts.values()), 2),
               hwm_run=hwm_run if reset else None, sampled_peak=smp.peak,
               # the whole process's peak, model and load included: what "fits in 4 GiB" means
               peak=max(hwm_load, hwm_run), run_peak=hwm_run if reset else smp.peak,
               loadavg_end=os.getloadavg()[0])
    out["increment"] = out["run_peak"] - rss_loaded
    return out

def spawn(spec, threads)->dict:
    "Run `--one spec` in a fresh interpreter (this parent never imports torch, so its RSS cannot leak in)"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--one", spec, "--threads", str(threads)],
                       capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("CHILD_JSON ")), None)
    if p.returncode or line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"spec": spec, "error": f"exit {p.returncode}: " + " | ".join(tail)}
    r = json.loads(line[len("CHILD_JSON "):]); r["process_s"] = round(time.perf_counter() - t, 1)
    return r

# ---------------------------------------------------------------------------------------------
# Same-process timing: census vs full cache, round robin
def timing(sizes, repeats, threads, quiet_budget=120, max_cache_gib=6.0)->list:
    import gc, statistics, torch
    sys.path.insert(0, str(HERE))
    from bench_cache import Quiet
    global QUIET
    QUIET = Quiet(quiet_budget)
    torch.set_num_threads(threads)
    from headscope.models import load_model
    from headscope.heads.patterns import pattern_scores
    from headscope.cache import run_with_cache, estimate_cache
    model = load_model(); tok = model.tokenizer
    rows = []
    for n in sizes:
        text, rep = inputs(tok, n)
        def census(): pattern_scores(model, text, rep, batch_size=1, progress=False)
        def cache():
            for ids in (text, rep): c = run_with_cache(model, ids, names=PATTERNS); del c
        def fwd():
            from headscope.hooking import forward
            with torch.no_grad():
                for ids in (text, rep): forward(model, {"input_ids": ids})
        fns = {"forward x2 (baseline)": fwd, "census (pattern_scores)": census, "full pattern cache x2": cache}
        need = max(estimate_cache(model, ids, names=PATTERNS).nbytes for ids in (text, rep))
        if need > max_cache_gib*GiB:                                   # would not fit: no cache contestant at this size
            del fns["full pattern cache x2"]
            log(f"  n={n}: full pattern cache not timed (would need {need/GiB:.1f} GiB per input)")
        times = {k: [] for k in fns}
        for f in fns.values(): f(); gc.collect()                       # warm-up
        for _ in range(repeats):
            for k, f in fns.items():
                QUIET()                                                 # wait (within a budget) for the cores to be free
                t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t); gc.collect()
        base = times["forward x2 (baseline)"]
        for k, ts in times.items():
            rows.append({"n": n, "name": k, "median_s": round(statistics.median(ts), 3), "times_s": [round(t, 3) for t in ts],
                         "paired_vs_forward": round(statistics.median(t/b for t, b in zip(ts, base)), 2),
                         "paired_vs_cache": round(statistics.median(t/c for t, c in zip(ts, times["full pattern cache x2"])), 2)
                                            if "full pattern cache x2" in times else None})
        log(f"  timed n={n}: " + ", ".join(f"{r['name']} {r['median_s']:.2f} s" for r in rows if r["n"] == n))
    log(f"  {QUIET.quiet}/{QUIET.calls} timed calls started with no other process running ({QUIET.waited:.0f} s spent waiting)")
    for r in rows: r["started_quiet"] = f"{QUIET.quiet}/{QUIET.calls}"
    return rows

# ---------------------------------------------------------------------------------------------
def fmt_gib(b): return "-" if b is None else f"{b/GiB:.2f}"

def timing_table(rows)->str:
    hdr = f"{'tokens':>6} {'what':26} {'median s':>9} {'x forward':>9} {'x cache':>8}"
    out = [hdr, "-"*len(hdr)]
    for r in rows:
        c = "-" if r["paired_vs_cache"] is None else format(r["paired_vs_cache"], ".2f")
        out.append(f"{r['n']:>6} {r['name']:26} {r['median_s']:9.2f} {r['paired_vs_forward']:9.2f} {c:>8}")
    out.append("x forward / x cache: median over rounds of (time / baseline time in the same round); "
               "forward x2 and cache x2: the text and the repeated input, as the census runs both.")
    return "\n".join(out)

def table(rows, max_gib)->str:
    hdr = f"{'tokens':>6} {'what':26} {'peak GiB':>8} {'+ GiB':>6} {'loaded GiB':>10} {'wall s':>8}  notes"
    out = [hdr, "-"*len(hdr)]
    for r in rows:
        if "error" in r: out.append(f"{r['n']:>6} {r['what']:26} FAILED: {r['error']}"); continue
        if r.get("skipped"):
            out.append(f"{r['n']:>6} {r['what']:26} {'-':>8} {'-':>6} {'-':>10} {'-':>8}  {r['skipped']}"); continue
        note = ""
        if r["kind"] == "load":
            out.append(f"{0:>6} {'model load only':26} {fmt_gib(r['peak']):>8} {'-':>6} {r['rss_loaded']/GiB:10.2f} {'-':>8}  "
                       f"RSS {r['rss_cold']/GiB:.2f} GiB right after load_model(), {r['rss_loaded']/GiB:.2f} after one 8-token forward")
            continue
        if r["kind"] == "cache":
            cb = r["cache_bytes"]
            note = (f"patterns {cb[0]['patterns']/GiB:.2f} + {cb[1]['patterns']/GiB:.2f} GiB, logits "
                    f"{cb[0]['logits']/MiB:.0f} MiB (text, repeated, one at a time)")
        elif r["kind"] == "census":
            note = f"text {r['text_len']} + repeated {r['repeated_len']} tokens; top induction head L{r['induction_top'][0][0]}H{r['induction_top'][0][1]} ({r['induction_max']:.2f})"
        out.append(f"{r['n']:>6} {r['what']:26} {fmt_gib(r['peak']):>8} {r['increment']/GiB:6.2f} {r['rss_loaded']/GiB:10.2f} "
                   f"{r['wall_s']:8.1f}  {note}")
    out.append("peak: the process's resident high-water mark, model and load included; +: peak during the run minus RSS "
               "after load and one 8-token forward;\nwall: the census or both caches, one call in a fresh process (indicative only on a shared machine).")
    return "\n".join(out)

def versions():
    from importlib.metadata import version
    v = {"python": platform.python_version()}
    for p in ("torch", "transformers", "headscope"):
        try: v[p] = version(p)
        except Exception: v[p] = None
    try: v["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception: pass
    return v

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 2048, 4096])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-cache-gib", type=float, default=6.0,
                   help="run the full-pattern cache only where its patterns (one input) fit in this many GiB")
    p.add_argument("--timing", action="store_true", help="also time census vs cache side by side in one process")
    p.add_argument("--timing-sizes", nargs="+", type=int, default=[512])
    p.add_argument("--repeats", type=int, default=3, help="timed calls each in --timing")
    p.add_argument("--quiet-budget", type=float, default=120,
                   help="seconds in all to wait, before timed calls, for other processes to stop running (0: never)")
    p.add_argument("--one", help="internal: run one configuration (census:N, cache:N, load:N) and print CHILD_JSON")
    p.add_argument("--out", default=str(OUT_JSON), help="JSON file to write ('' for none)")
    p.add_argument("--show", metavar="JSON", help="print the tables of a saved run and exit")
    p.add_argument("--timing-only", action="store_true",
                   help="only the same-process timing; replaces `timing` in the existing --out file, keeping its memory rows")
    args = p.parse_args(argv)

    if args.show:
        res = json.loads(pathlib.Path(args.show).read_text())
        log(table(res["rows"], res["meta"]["max_cache_gib"]))
        if res.get("verdict_4096"): log(f"{res['verdict_4096']} at 4,096 tokens (limit {res['limit_bytes']/GiB:g} GiB)")
        if res.get("timing"): log("\n" + timing_table(res["timing"]))
        return

    if args.one:
        print("CHILD_JSON " + json.dumps(one(args.one, args.threads)), flush=True); return

    if args.timing_only:
        out = pathlib.Path(args.out); res = json.loads(out.read_text()) if out.exists() else {"meta": {}, "rows": []}
        la0 = os.getloadavg()[0]
        log(f"timing census vs cache in one process ({args.repeats} round-robin calls after a warm-up), load average {la0:.1f}...")
        res["timing"] = timing(args.timing_sizes, args.repeats, args.threads, args.quiet_budget, args.max_cache_gib)
        res["meta"]["timing"] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "sizes": args.timing_sizes, "repeats": args.repeats,
                                 "loadavg_start": la0, "loadavg_end": os.getloadavg()[0]}
        log(timing_table(res["timing"]))
        out.write_text(json.dumps(res, indent=1) + "\n"); log(f"wrote {out} [timing]")
        return

    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": args.threads, "sizes": args.sizes,
            "max_cache_gib": args.max_cache_gib, "loadavg_start": os.getloadavg()[0],
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE")*os.sysconf("SC_PHYS_PAGES")/GiB, 1), "cpus": os.cpu_count()}
    log(f"bench_census: SmolLM2-135M-Instruct fp32, one sequence of {args.sizes} tokens, {args.threads} threads, "
        f"{meta['mem_total_gib']} GiB RAM, load average {meta['loadavg_start']:.1f} on {meta['cpus']} cores")
    rows, t0 = [], time.time()
    r = spawn("load:512", args.threads); r["what"] = "model load only"; rows.append({**r, "n": 0})
    log(f"  load only: peak {fmt_gib(r.get('peak'))} GiB, RSS after load {fmt_gib(r.get('rss_cold'))} GiB, "
        f"after one 8-token forward {fmt_gib(r.get('rss_loaded'))} GiB")
    for n in args.sizes:
        r = spawn(f"census:{n}", args.threads); r.update(what="census (pattern_scores)", n=n); rows.append(r)
        log(f"  census {n}: " + (r["error"] if "error" in r else f"peak {fmt_gib(r['peak'])} GiB, {r['wall_s']} s"))
        est = r.get("pattern_cache_bytes_est")
        need = max(est["float32"]) if est else None
        if need is not None and need > args.max_cache_gib*GiB:
            rows.append({"n": n, "what": "full pattern cache", "kind": "cache", "skipped":
                         f"(not run: would need {need/GiB:.1f} GiB of fp32 patterns per input, "
                         f"{max(est['bfloat16'])/GiB:.1f} GiB in bf16, plus the model and the logits; > --max-cache-gib {args.max_cache_gib:g})",
                         "pattern_cache_bytes_est": est})
            log(f"  cache {n}: {rows[-1]['skipped']}")
            continue
        r = spawn(f"cache:{n}", args.threads); r.update(what="full pattern cache", n=n); rows.append(r)
        log(f"  cache {n}: " + (r["error"] if "error" in r else f"peak {fmt_gib(r['peak'])} GiB, {r['wall_s']} s"))
    meta["wall_s"] = round(time.time() - t0, 1); meta["loadavg_end"] = os.getloadavg()[0]

    log("\n" + table(rows, args.max_cache_gib))
    verdict = None
    c = next((r for r in rows if r.get("kind") == "census" and r.get("n") == 4096 and "peak" in r), None)
    if c is not None:
        verdict = "PASS" if c["peak"] <= LIMIT else "FAIL"
        log(f"\n{verdict}: census of SmolLM2 on 4,096 tokens peaks at {c['peak']/GiB:.2f} GiB resident "
            f"(model and load included; {c['increment']/GiB:.2f} GiB over the {c['rss_loaded']/GiB:.2f} GiB after load) "
            f"{'<=' if verdict == 'PASS' else '>'} 4 GiB")
    else: log("\nno 4,096-token census in this run: no PASS/FAIL")

    timed = None
    if args.timing:
        log(f"\ntiming census vs cache in one process ({args.repeats} round-robin calls after a warm-up)...")
        timed = timing(args.timing_sizes, args.repeats, args.threads, args.quiet_budget, args.max_cache_gib)
        log(timing_table(timed))
    meta["loadavg_after_timing"] = os.getloadavg()[0]
    if meta["loadavg_start"] > args.threads or meta["loadavg_end"] > args.threads:
        log(f"\nwarning: load average {meta['loadavg_start']:.1f} at start, {meta['loadavg_end']:.1f} at end on "
            f"{meta['cpus']} cores: other processes shared the CPU, wall times are inflated and noisy")
    if args.out:
        out = pathlib.Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
        meta["versions"] = versions()
        out.write_text(json.dumps({"meta": meta, "limit_bytes": LIMIT, "verdict_4096": verdict,
                                   "rows": rows, "timing": timed}, indent=1) + "\n")
        log(f"wrote {out}")

if __name__ == "__main__": main()
