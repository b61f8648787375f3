#!/usr/bin/env python
"""Parity with the `steering-vectors` package (PyPI, v0.12): difference-of-means vectors, steered logits,
steered greedy generation and timing, SmolLM2-135M-Instruct (fp32, CPU, 2 threads).

steering-vectors needs transformers < 5, so this runs in its own venv, which also checks headscope on
transformers 4.57:

    bash bench/setup_sv.sh                                              # once; idempotent
    bench/.venvs/sv/bin/python bench/bench_steering_vectors.py [--repeats 3]

What is compared, on the same model object, tokenizer and prompts (semantics read from steering-vectors'
source, `train_steering_vector.py`, `record_activations.py`, `steering_vector.py`):
- (a) vector: `train_steering_vector(model, tok, pairs, layers=L, read_token_index=-1)` records the output
  of the decoder block `model.model.layers[l]` (a forward hook; headscope's `blocks.{l}.hook_resid_post`),
  at the last real token of each prompt (its index is shifted past any padding), and aggregates with
  `mean_aggregator`: mean over pairs of (positive - negative), in float32. headscope:
  `diff_in_means(model, pos, neg, layers=L, hook="hook_resid_post", pos=-1)`: mean(positive) - mean(negative)
  in float64, from left-padded batches of 16. With equal-sized paired lists the two are the same quantity.
  A third reference: plain HF `output_hidden_states` (`hidden_states[l + 1]` is block l's output for
  l < n_layers - 1), one unpadded prompt at a time, averaged in float64.
- (b) steered logits: `SteeringVector.apply(model, multiplier=c)` (its default `min_token_index=0`: the
  vector is added at every position of every forward, pads included, and at each generated token) against
  `headscope.probes.steering.steer(model, vec, coeff=c)` (its default `pos=None`: every position, pads included,
  and each generated token). Same semantics, so nothing is adjusted. Logits are compared at real tokens
  of one left-padded batch; pads never reach a real token (the attention mask hides them).
  Done twice: each package with its own vector (end to end), and both with the same vector (the
  application alone), at all of L and at one layer.
- (c) greedy `generate` (20 new tokens, one prompt at a time) under each: the same token ids?
- (d) best-of-N wall time of the extraction and of one steered forward, as ratios. The 2 cores are shared
  with other jobs; calls run round robin and each waits (within a budget) for an idle machine, but the
  ratios are rough. Also a milder generation (coeff `--gen-coeff` at one layer) to show text that still reads.

Writes bench/results/bench_steering_vectors.json and prints one `BENCH_JSON {...}` line."""
import argparse, json, os, pathlib, sys, time
from importlib.metadata import version

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PAIRS = [  # (positive, negative): the same sentence, the sentiment word last, so the read token carries it
    ("I watched the movie last night and it was wonderful", "I watched the movie last night and it was awful"),
    ("The food at the new restaurant tasted delicious", "The food at the new restaurant tasted disgusting"),
    ("My trip to the coast this summer was fantastic", "My trip to the coast this summer was miserable"),
    ("The customer service team was very helpful", "The customer service team was very rude"),
    ("After the long week, I feel happy", "After the long week, I feel sad"),
    ("The concert last weekend was amazing", "The concert last weekend was terrible"),
    ("Honestly, the new phone works great", "Honestly, the new phone works badly"),
    ("Our neighbours are friendly", "Our neighbours are hostile"),
    ("The hotel room was clean and comfortable", "The hotel room was dirty and uncomfortable"),
    ("Reading that book made me feel joyful", "Reading that book made me feel depressed"),
    ("The weather on our wedding day was perfect", "The weather on our wedding day was dreadful"),
    ("I think this plan is excellent", "I think this plan is horrible"),
    ("The teacher's feedback was encouraging", "The teacher's feedback was discouraging"),
    ("Working with this team has been a pleasure", "Working with this team has been a nightmare"),
    ("The ending of the story was beautiful", "The ending of the story was ugly"),
    ("Overall, I would call the experience delightful", "Overall, I would call the experience painful"),
]
NEUTRAL = ["The weather today is", "I went to the store and", "My opinion of the new restaurant is",
           "Yesterday my friend told me that the film was"]
LAYERS = [8, 12, 16]
ONE_LAYER = 12

def log(*a): print(*a, flush=True)

def maxdiff(a, b): return float((a.double() - b.double()).abs().max())

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per contestant (best is kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--coeff", type=float, default=4.0)
    ap.add_argument("--gen-coeff", type=float, default=1.0, help="a milder setting for generation, at one layer")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--quiet-budget", type=float, default=120, help="seconds in all to wait for an idle machine")
    ap.add_argument("--out", default=str(HERE/"results"/"bench_steering_vectors.json"))
    a = ap.parse_args()

    import torch, transformers
    torch.set_num_threads(a.threads)
    # headscope caches the HF folder it converts from the GGUF. A folder written by transformers 5 names its
    # tokenizer class `TokenizersBackend`, which transformers 4.x cannot load: keep a 4.x folder apart.
    if int(transformers.__version__.split(".")[0]) < 5:
        os.environ.setdefault("HEADSCOPE_CACHE", str(HERE/".venvs"/"sv"/"headscope-cache"))
    import steering_vectors as sv
    from headscope.models import load_model
    from headscope.hooking import to_inputs
    from headscope.probes.steering import SteeringVector, diff_in_means, steer
    from bench_cache import Quiet

    vers = {p: version(p) for p in ("torch", "transformers", "steering-vectors", "headscope")}
    log("versions:", "  ".join(f"{k}=={v}" for k, v in vers.items()))
    model = load_model(dtype=torch.float32)
    tok = model.tokenizer
    pos_p, neg_p = [p for p, _ in PAIRS], [n for _, n in PAIRS]
    n_layers = model.config.num_hidden_layers
    assert max(LAYERS) < n_layers - 1  # hidden_states[l + 1] is block l's raw output only below the last layer
    quiet = Quiet(a.quiet_budget)
    res = dict(versions=vers, threads=a.threads, coeff=a.coeff, gen_coeff=a.gen_coeff, one_layer=ONE_LAYER, layers=LAYERS, n_pairs=len(PAIRS), neutral=NEUTRAL)

    # ---------------------------------------------------------------- (a) the vector
    with torch.no_grad():
        v_sv = sv.train_steering_vector(model, tok, PAIRS, layers=LAYERS, read_token_index=-1)            # batch_size=1
        v_sv16 = sv.train_steering_vector(model, tok, PAIRS, layers=LAYERS, read_token_index=-1, batch_size=16)
        v_hs = diff_in_means(model, pos_p, neg_p, layers=LAYERS, hook="hook_resid_post", pos=-1, progress=False)
        def hf_mean(prompts):
            hs = [model(**tok(p, return_tensors="pt"), output_hidden_states=True).hidden_states for p in prompts]
            return {l: torch.stack([h[l + 1][0, -1].double() for h in hs]).mean(0) for l in LAYERS}
        hp, hn = hf_mean(pos_p), hf_mean(neg_p)
        v_hf = {l: hp[l] - hn[l] for l in LAYERS}
    vec = []
    for l in LAYERS:
        s, s16, h, r = v_sv.layer_activations[l], v_sv16.layer_activations[l], v_hs.vectors[l], v_hf[l]
        vec.append(dict(layer=l, norm=float(h.norm()), hs_vs_sv=maxdiff(h, s), hs_vs_sv_bs16=maxdiff(h, s16),
                        hs_vs_hf=maxdiff(h, r), sv_vs_hf=maxdiff(s, r), sv_bs16_vs_hf=maxdiff(s16, r),
                        cos_hs_sv=float(torch.nn.functional.cosine_similarity(h.double(), s.double(), 0))))
    res["vector"] = vec

    # ---------------------------------------------------------------- (b) steered logits
    x = to_inputs(model, NEUTRAL, padding_side="left")
    real = x["attention_mask"].bool()
    with torch.no_grad():
        base = model(**x).logits
        def sv_logits(v, c):
            with v.apply(model, multiplier=c): return model(**x).logits
        def hs_logits(v, c, layers=None):
            with steer(model, v, coeff=c, layers=layers): return model(**x).logits
        one_sv = sv.SteeringVector({ONE_LAYER: v_sv.layer_activations[ONE_LAYER]}, v_sv.layer_type)
        same_hs = SteeringVector(dict(v_sv.layer_activations))                 # steering-vectors' own vector
        cases = {
            f"all of {LAYERS}, own vectors": (sv_logits(v_sv, a.coeff), hs_logits(v_hs, a.coeff)),
            f"all of {LAYERS}, same vector": (sv_logits(v_sv, a.coeff), hs_logits(same_hs, a.coeff)),
            f"layer {ONE_LAYER}, own vectors": (sv_logits(one_sv, a.coeff), hs_logits(v_hs, a.coeff, layers=[ONE_LAYER])),
            f"layer {ONE_LAYER}, same vector": (sv_logits(one_sv, a.coeff), hs_logits(same_hs, a.coeff, layers=[ONE_LAYER])),
        }
        after = model(**x).logits
    res["logits"] = [dict(case=k, max_abs_diff=maxdiff(s[real], h[real]), max_abs_logit=float(s[real].abs().max()),
                          steering_effect=maxdiff(s[real], base[real]),
                          same_argmax=bool(torch.equal(s[real].argmax(-1), h[real].argmax(-1))))
                     for k, (s, h) in cases.items()]
    res["hooks_removed"] = bool(torch.equal(after, base))

    # ---------------------------------------------------------------- (c) greedy generation
    gens = []
    with torch.no_grad():
        for p in NEUTRAL:
            ids = tok(p, return_tensors="pt")
            g = lambda: model.generate(**ids, max_new_tokens=a.new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
            plain = g()
            with v_sv.apply(model, multiplier=a.coeff): o_sv = g()
            with steer(model, v_hs, coeff=a.coeff): o_hs = g()
            with steer(model, same_hs, coeff=a.coeff): o_same = g()
            with one_sv.apply(model, multiplier=a.gen_coeff): m_sv = g()
            with steer(model, v_hs, coeff=a.gen_coeff, layers=[ONE_LAYER]): m_hs = g()
            gens.append(dict(prompt=p, same_tokens=bool(torch.equal(o_sv, o_hs)), same_tokens_same_vector=bool(torch.equal(o_sv, o_same)),
                             same_tokens_mild=bool(torch.equal(m_sv, m_hs)), mild_steering_vectors=tok.decode(m_sv), mild_headscope=tok.decode(m_hs),
                             first_divergence=next((i for i, (s, h) in enumerate(zip(o_sv.tolist(), o_hs.tolist())) if s != h), None),
                             unsteered=tok.decode(plain), steering_vectors=tok.decode(o_sv), headscope=tok.decode(o_hs)))
    res["generation"] = gens

    # ---------------------------------------------------------------- (d) timing
    # Round robin (one call of each contestant per round), so a drifting machine hits all alike; the best
    # call of each, and the median over rounds of the per-round ratio. The extractions are warm from (a).
    def rounds(fns, n):
        ts = {k: [] for k in fns}
        for _ in range(n):
            for k, fn in fns.items():
                quiet(2.0); t0 = time.perf_counter(); fn(); ts[k].append(time.perf_counter() - t0)
        return ts
    med = lambda xs: sorted(xs)[len(xs) // 2]
    with torch.no_grad():
        ex = rounds(dict(sv_bs1=lambda: sv.train_steering_vector(model, tok, PAIRS, layers=LAYERS, read_token_index=-1),
                         sv_bs16=lambda: sv.train_steering_vector(model, tok, PAIRS, layers=LAYERS, read_token_index=-1, batch_size=16),
                         hs=lambda: diff_in_means(model, pos_p, neg_p, layers=LAYERS, pos=-1, progress=False)), a.repeats)
        fw = rounds(dict(plain=lambda: model(**x).logits, sv=lambda: sv_logits(v_sv, a.coeff),
                         hs=lambda: hs_logits(v_hs, a.coeff)), 5 * a.repeats)
    t = {f"extract_{k}": min(v) for k, v in ex.items()} | {f"forward_{k}": min(v) for k, v in fw.items()}
    res["timing_s"] = t
    res["timing_ratio"] = dict(
        extract_hs_over_sv_bs1=(t["extract_hs"] / t["extract_sv_bs1"], med([h / s for h, s in zip(ex["hs"], ex["sv_bs1"])])),
        extract_hs_over_sv_bs16=(t["extract_hs"] / t["extract_sv_bs16"], med([h / s for h, s in zip(ex["hs"], ex["sv_bs16"])])),
        forward_hs_over_sv=(t["forward_hs"] / t["forward_sv"], med([h / s for h, s in zip(fw["hs"], fw["sv"])])),
        forward_sv_over_plain=(t["forward_sv"] / t["forward_plain"], med([h / s for h, s in zip(fw["sv"], fw["plain"])])),
        forward_hs_over_plain=(t["forward_hs"] / t["forward_plain"], med([h / s for h, s in zip(fw["hs"], fw["plain"])])))
    res["quiet"] = dict(calls=quiet.calls, quiet_calls=quiet.quiet, waited_s=round(quiet.waited, 1))
    res["date_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    # ---------------------------------------------------------------- report
    log(f"\n(a) difference-of-means vector, {len(PAIRS)} pairs, last token, blocks.{{l}}.hook_resid_post, max |diff|")
    log(f"{'layer':>5} {'|v|':>8} {'hs vs sv':>10} {'hs vs sv16':>10} {'hs vs HF':>10} {'sv vs HF':>10} {'sv16 vs HF':>10} {'cos':>10}")
    for r in vec:
        log(f"{r['layer']:>5} {r['norm']:>8.3f} {r['hs_vs_sv']:>10.2e} {r['hs_vs_sv_bs16']:>10.2e} {r['hs_vs_hf']:>10.2e} "
            f"{r['sv_vs_hf']:>10.2e} {r['sv_bs16_vs_hf']:>10.2e} {r['cos_hs_sv']:>10.7f}")
    log(f"\n(b) steered logits, coeff {a.coeff}, {len(NEUTRAL)} prompts (left-padded batch), real tokens only")
    log(f"{'case':<32} {'max|diff|':>10} {'max|logit|':>10} {'|steered-plain|':>15} {'argmax eq':>9}")
    for r in res["logits"]:
        log(f"{r['case']:<32} {r['max_abs_diff']:>10.2e} {r['max_abs_logit']:>10.2f} {r['steering_effect']:>15.2f} {str(r['same_argmax']):>9}")
    log(f"hooks removed after both (plain logits bit-identical): {res['hooks_removed']}")
    log(f"\n(c) greedy generation, {a.new_tokens} new tokens, coeff {a.coeff} at {LAYERS}")
    for r in gens:
        log(f"  {r['prompt']!r}: same tokens {r['same_tokens']} (same vector: {r['same_tokens_same_vector']})")
        log(f"      unsteered: {r['unsteered']!r}\n      steered:   {r['headscope']!r}")
        log(f"      mild (coeff {a.gen_coeff} at layer {ONE_LAYER}): same tokens {r['same_tokens_mild']}: {r['mild_headscope']!r}")
    log(f"\n(d) best of {a.repeats} rounds (extraction) / {5 * a.repeats} rounds (forward), {a.threads} threads; shared cores, rough")
    for k, v in t.items(): log(f"  {k:<18} {v:8.3f} s")
    log(f"  {'ratio':<26} {'best/best':>9} {'median paired':>13}")
    for k, (b, m) in res["timing_ratio"].items(): log(f"  {k:<26} {b:8.2f}x {m:12.2f}x")
    log(f"  quiet machine before {quiet.quiet}/{quiet.calls} timed calls (waited {quiet.waited:.0f} s)")
    out = pathlib.Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"\nwrote {out}")
    log("BENCH_JSON " + json.dumps(dict(vector=vec, logits=res["logits"], same_tokens=[(g["same_tokens"], g["same_tokens_mild"]) for g in gens],
                                        timing_ratio=res["timing_ratio"])))

if __name__ == "__main__": main()
