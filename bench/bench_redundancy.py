"""Single-sublayer drops of all 60 sublayers of SmolLM2 (KL from the full model), three ways, in one process.

Contestants: a loop of one forward per dropped sublayer with the public `drop_sublayers` hooks (the baseline);
`sublayer_redundancy`'s scorer with the drops spread over the batch but every block computed (replay off);
and the scorer as shipped (batched, blocks before a forward's first drop replayed from the clean run).
The three must agree to float32 rounding; the ratios are against the loop.

    .venv/bin/python bench/bench_redundancy.py                # ~1-2 min on 2 quiet cores
"""
import argparse, contextlib, time
import torch
from headscope.models import load_model
from headscope.data.corpora import python_docs_corpus, token_windows
from headscope.hooking import hooks, forward
import headscope.causal.redundancy as R

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("--rows", type=int, default=2); ap.add_argument("--len", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=1024); ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = load_model()
    win = list(token_windows(m.tokenizer, python_docs_corpus(), a.len))
    x = {"input_ids": torch.stack([win[i * 500] for i in range(a.rows)])}
    sets = [[(k, l)] for k in ("attn", "mlp") for l in range(m.config.num_hidden_layers)]
    sc = R._Scorer(m, x, "kl", a.max_tokens)
    with torch.no_grad(): m(**x)                                           # warm up
    t = time.perf_counter()
    loop = []
    for s in sets:
        with torch.no_grad(), hooks(m, R.drop_sublayers(m, [R.sublayer_name(*c) for c in s])): loop.append(sc.score(forward(m, x).logits[:, :-1]))
    t_loop = time.perf_counter() - t
    replay = R._BlocksReplay
    R._BlocksReplay = lambda *args: contextlib.nullcontext()
    t = time.perf_counter(); no_replay = sc.run(sets); t_batch = time.perf_counter() - t
    R._BlocksReplay = replay
    t = time.perf_counter(); shipped = sc.run(sets); t_ship = time.perf_counter() - t
    loop = torch.tensor(loop)
    print(f"{len(sets)} single drops, {a.rows} x {a.len} tokens, max_tokens={a.max_tokens}, {a.threads} threads")
    print(f"  loop (one forward per drop)   {t_loop:6.2f}s  1.00x")
    print(f"  batched, every block computed {t_batch:6.2f}s  {t_loop / t_batch:.2f}x   max |diff| {float((no_replay - loop).abs().max()):.2e}")
    print(f"  batched + replay (shipped)    {t_ship:6.2f}s  {t_loop / t_ship:.2f}x   max |diff| {float((shipped - loop).abs().max()):.2e}")
