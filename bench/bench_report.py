"""What a newcomer waits for: `headscope report` and the census tutorial's `head_census`, against plain forwards, in one process.

    .venv/bin/python bench/bench_report.py             # ~4 min on 2 quiet cores (--repeats 3)

Prints each contestant's median wall time and its ratio to a plain forward of the report's prompt (the
14-token IOI prompt, `logits` for every position, no hooks), timed in the same process, round robin.
"""
import argparse, json, statistics, time
import torch
from headscope.models import load_model
from headscope.report import report_html
from headscope.cli import DEFAULT_PROMPT
from headscope.data.needles import needle_tasks, text_tokens
from headscope.heads.census import head_census
from headscope.tokens import to_inputs

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("--repeats", type=int, default=3); a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter(); model = load_model(); t_load = time.perf_counter() - t0
    tok = model.tokenizer
    x = to_inputs(model, DEFAULT_PROMPT)
    tasks, abl = needle_tasks(tok, n=6, haystack_len=256, seed=1), text_tokens(tok, 2, 64, seed=1)
    def fwd():
        with torch.no_grad(): model(**x)
    tut = lambda **kw: head_census(model, tasks=tasks, ablation_text=abl, prompt="The capital of France is", answer=" Paris", progress=False, **kw)
    contestants = {
        "plain forward of the prompt (baseline)": fwd,
        "report_html (census included)": lambda: report_html(model, DEFAULT_PROMPT),
        "report_html(census=False)": lambda: report_html(model, DEFAULT_PROMPT, census=False),
        "census, tutorial settings (default: bf16 ablation where native)": tut,
        "census, tutorial settings, ablation_dtype=None (exact)": lambda: tut(ablation_dtype=None),
    }
    for f in contestants.values(): f()                                  # warm-up
    times = {k: [] for k in contestants}
    base_reps = 11
    for r in range(a.repeats):
        for k, f in contestants.items():
            for _ in range(base_reps if f is fwd else 1):
                t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    base = statistics.median(times["plain forward of the prompt (baseline)"])
    print(f"model load {t_load:.1f} s; prompt {x['input_ids'].shape[1]} tokens; {a.repeats} rounds after a warm-up\n")
    print(f"{'contestant':58s} {'median s':>9s} {'min s':>7s} {'forwards':>9s}")
    rows = []
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:58s} {m:9.3f} {min(v):7.3f} {m / base:9.1f}")
        rows.append(dict(contestant=k, median_s=m, min_s=min(v), forwards=m / base))
    print("BENCH_JSON " + json.dumps(rows))
