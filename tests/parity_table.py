"""The README's architecture table, generated from the tiny models so that claim and tests cannot drift.

`python tests/parity_table.py` rewrites the table between the markers in README.md; `--check` (and
tests/test_parity_table.py) fails if the README is stale. Every listed architecture is one that
tests/test_exact.py proves with its whole battery; the numbers here are measured, not typed:

- hook points: on the 2-layer tiny model, opt-in ones included;
- read-only bitwise: hooks on every point that only read leave the logits bit-for-bit equal;
- max |Δlogit|: the largest change of the logits when a hook point is replaced by its own cached value,
  over every point of block 0 and every global point, one at a time (the recompute paths: explicit
  attention, re-routing, rescaled norms...), shown as a power-of-ten bound (the digits differ between CPUs).

The second table lists families headscope refuses, with the reason its error message gives."""
import math, sys, warnings
from pathlib import Path
import torch, transformers

README = Path(__file__).resolve().parents[1]/"README.md"
START, END = "<!-- parity:start -->", "<!-- parity:end -->"

NOTES = {   # what the numbers do not say; the structural notes are generated from the spec
    "gpt2": "q/k/v slices of the fused `c_attn` are copied into the cache",
    "qwen3": "q/k norms come after `hook_q`/`hook_k`, before `hook_rot_q`/`hook_rot_k`",
    "gemma": "embeddings scaled by sqrt(d_model) before block 0",
    "gemma2": "soft-caps scores (in `hook_attn_scores`) and logits (after `hook_logits`); eager attention only",
    "gemma3": "the text-only `Gemma3ForCausalLM`; sliding-window layers honoured",
    "gemma3_multimodal": "the text part of `Gemma3ForConditionalGeneration`; the vision tower is not hooked",
    "granite": "`hook_attn_out`/`hook_mlp_out` are before `residual_multiplier` (resid_mid = resid_pre + m * attn_out); logits divided by `logits_scaling` after `hook_logits`",
    "granitemoe": "Granite's multipliers, as `granite`",
    "nemotron": "LayerNorm1P (gain 1 + weight): hook points exact; `fold_norm` reads `weight` only",
    "phimoe": "sparsemixer routing re-runs on replaced logits",
    "qwen2_moe": "shared expert inside `hook_mlp_out`",
    "cohere": "a bias-free LayerNorm (told from an RMSNorm by behaviour); logits multiplied by `logit_scale` after `hook_logits`",
    "olmo": "weightless LayerNorms, eps 1e-5 hard-coded in their forward (measured)",
    "smollm3": "NoPE layers (every 4th) exist only in deeper models",
    "gptj": "partial rotary (`rotary_dim`)", "stablelm": "partial rotary", "phi": "partial rotary",
    "gpt_bigcode": "multi-query attention: one key/value head",
    "deepseek_v2": "MLA: `hook_q` is `q_b_proj`'s output, [nope | rope] per head; no `hook_k` (keys are rebuilt from a shared latent: `hook_rot_k`, `hook_v` are per head)",
    "bloom": "ALiBi: no positions, each head's slope * key position is in `hook_attn_scores`; a LayerNorm over the embeddings before block 0; "
             "`hook_attn_out`/`hook_mlp_out` are `self_attention.dense`/`mlp.dense_4h_to_h`'s outputs (the residual is added inside the modules); eager attention only",
    "bert": "segment embeddings: `hook_token_type_embed`",
    "roberta": "positions numbered from the pad id + 1, per row",
    "distilbert": "`hook_attn_out` is `out_lin`'s output, inside the attention module",
    "modernbert": "pre-LN; layer 0 has no attention norm (no `ln1` points there); global and sliding-window layers alternate; GLU MLP `Wi` = [input | gate]; `model.final_norm` (no hook point) feeds the MLM head",
    "dinov2_with_registers": "2 register tokens after `[CLS]` (pos = 3 + patches), left out of the classifier's patch mean; LayerScale as `dinov2`",
    "deit": "a distillation token after `[CLS]`: pos = 2 + patches",
    "dinov2": "LayerScale: `hook_attn_out`/`hook_mlp_out` are `layer_scale1`/`layer_scale2`'s outputs; classifier on [CLS] with the patches' mean",
    "deepseek_v3": "MLA as `deepseek_v2`, rope features de-interleaved between `hook_q` and `hook_rot_q`; sigmoid router with group-limited top-k; layer 0 dense (`hook_pre`/`hook_post`), layer 1 MoE",
}

# families headscope refuses on a tiny config of their own: model_type -> config keywords
REFUSED = {
    "codegen": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8),
    "gpt_oss": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
}

def _ids(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    if m.main_input_name == "pixel_values": return torch.randn(2, 3, 16, 16, generator=g)   # a vision transformer: 16 patches + prefix
    return torch.randint(3, m.config.get_text_config().vocab_size, (2, 12), generator=g)

def _notes(m, arch)->str:
    from headscope.arch import arch_spec, model_dims
    sp, d, c = arch_spec(m), model_dims(m), m.config.get_text_config()
    out = []
    if d.moe_layers: out.append(f"MoE: router `{sp.router}` -> `mlp.hook_router`, {d.n_experts} experts, top-{d.top_k}; no `hook_pre`/`hook_post`")
    if sp.post_ln: out.append("post-LN: `hook_resid_mid`/`hook_resid_post` are the inputs of `ln1`/`ln2`, `ln2.hook_normalized` the block's output")
    if sp.head: out.append("bidirectional attention; `embed.ln` over the embeddings; `ln_final` is the MLM head's norm, `hook_logits` the MLM logits")
    if sp.unembed: out.append("non-causal attention over [CLS] + patches; `hook_logits` `[batch d_vocab]` is the classifier's, d_vocab = labels")
    if sp.pos_embed: out.append("learned positions: `hook_pos_embed`")
    if not sp.rotary: out.append("no rotary: no `hook_rot_q`/`hook_rot_k`")
    if d.parallel: out.append("one norm feeds attention and MLP: no `ln2`, `hook_attn_in`, `hook_mlp_in`" if sp.ln2 is None and sp.ln1
                              else "parallel attention and MLP: no `hook_resid_mid`")
    if sp.sublayer_norm: out.append("norms after sublayers: `hook_attn_out`/`hook_mlp_out` are their outputs")
    if sp.ln1 is None: out.append("no pre-norms: no `ln1`/`ln2` points")
    if sp.qkv_fused: out.append(f"fused qkv ({sp.qkv_fused}): `hook_q`/`hook_k` are its slices")
    if sp.fused_gate_up: out.append("fused `gate_up_proj`: `hook_pre`/`hook_pre_linear` are its halves")
    if not d.gated and not d.moe_layers and not (sp.head or sp.unembed): out.append("MLP not gated")
    if d.n_kv_heads < d.n_heads: out.append("GQA" if d.n_kv_heads > 1 else "MQA")
    if getattr(c, "sliding_window", None) and "gemma" not in arch: out.append("sliding window")
    if arch in NOTES: out.append(NOTES[arch])
    return "; ".join(out)

def row(arch:str)->dict:
    "One measured row for `tiny_model(arch)`"
    from headscope.models import tiny_model
    from headscope.arch import arch_spec, model_hook_names, ARCH_SPECS
    from headscope.cache import run_with_cache
    from headscope.hooking import run_with_hooks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tiny_model(arch)
    ids, names = _ids(m), model_hook_names(m)
    with torch.no_grad(): plain = m(ids).logits
    bitwise = torch.equal(run_with_hooks(m, ids, [(n, lambda a, h: None) for n in names]), plain)
    c = run_with_cache(m, ids, names=names)
    pick = [n for n in names if not n.startswith("blocks.") or n.startswith("blocks.0.")]
    err = max((run_with_hooks(m, ids, [(n, lambda a, h, v=c[n]: v)]).double() - plain.double()).abs().max().item() for n in pick)
    mt = m.config.model_type
    name = type(m).__name__
    for sfx in ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM", "ForImageClassification"): name = name.removesuffix(sfx)
    return dict(arch=name, model_type=mt, tiny=arch,
                spec="table" if mt in ARCH_SPECS else "inferred" if arch_spec(m).inferred else "?", points=len(names),
                bitwise=bitwise, err=err, notes=_notes(m, arch))

def refused(mt:str, kw:dict)->str:
    "The reason headscope gives for refusing `mt`, from a tiny model of it"
    from headscope.arch import arch_spec, UnsupportedArchitectureError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(mt, vocab_size=259, max_position_embeddings=64, **kw)
        m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    try: arch_spec(m)
    except UnsupportedArchitectureError as e:
        msg = str(e)
        msg = msg.split("could not infer one: ", 1)[-1].split(" Supported:")[0].split(" Did you mean")[0].rstrip(".")
        return msg.removeprefix("the inferred hook map failed its check: ")
    return "(accepted: move it to the table above)"

def _bound(err:float)->str:
    "A power-of-ten bound rather than the digits, which differ between CPUs' kernels"
    return "0" if err == 0 else f"< 1e{max(math.ceil(math.log10(err)), -6)}"

HEADER = ["| architecture | `model_type` | hook map | hook points | read-only bitwise | max \\|Δlogit\\| | notes |", "|---|---|---|---|---|---|---|"]

def _lines(rows)->list:
    out = []
    for r in rows:
        mt = f"`{r['model_type']}`" + (f" (`tiny_model(\"{r['tiny']}\")`)" if r["tiny"] != r["model_type"] else "")
        out.append(f"| {r['arch']} | {mt} | {r['spec']} | {r['points']} | {'yes' if r['bitwise'] else 'NO'} | {_bound(r['err'])} | {r['notes']} |")
    return out

def table()->str:
    from headscope.models import TINY_ARCHS, MORE_ARCHS
    from headscope.tiny_encoders import ENCODER_ARCHS, VISION_ARCHS
    rows = [row(a) for a in TINY_ARCHS + MORE_ARCHS]
    rows.sort(key=lambda r: (r["spec"] != "table", r["model_type"], r["tiny"]))
    lines = [f"{len(rows)} architectures, each proven on a tiny model by tests/test_exact.py "
             f"(transformers {transformers.__version__}; generated by `python tests/parity_table.py`).", "", *HEADER, *_lines(rows)]
    enc = [row(a) for a in ENCODER_ARCHS + VISION_ARCHS]
    lines += ["", f"{len(enc)} encoders (`*ForMaskedLM`, from `tiny_model`) and vision transformers (`*ForImageClassification`, 16x16 images "
              "in 4x4 patches), proven by the same battery (its decoder-only checks adapted to post-LN blocks, MLM heads and classifiers; "
              "Δlogit for the classifiers is over `[batch d_vocab]`):", "", *HEADER, *_lines(enc)]
    lines += ["", "Refused, with the reason headscope's error gives (on a tiny model of each):", "",
              "| `model_type` | why |", "|---|---|"]
    lines += [f"| `{mt}` | {refused(mt, kw)} |" for mt, kw in REFUSED.items()]
    return "\n".join(lines)

def render(text:str, tbl:str)->str:
    if START not in text or END not in text: raise ValueError(f"README.md has no {START} ... {END} markers")
    a, b = text.index(START) + len(START), text.index(END)
    return text[:a] + "\n" + tbl + "\n" + text[b:]

if __name__ == "__main__":
    torch.set_num_threads(1)
    text = README.read_text()
    new = render(text, table())
    if "--check" in sys.argv:
        if new != text: sys.exit("README.md's architecture table is stale: run `python tests/parity_table.py`")
    else: README.write_text(new); print(f"wrote the architecture table into {README}")
