"""Attention with per-head row statistics, flash-style: the output and a census of every row, O(n) memory.

`attention_with_stats(q, k, v, ...)` returns the attention output (optional: pass `v=None` for the
statistics alone) and, for every batch row, query head and query position, the statistics the head
census reads (`STAT_NAMES`): the mass on the first key (`sink`), on the previous key (`prev`), on a
key chosen per query (`target`: induction, duplicate-token and needle scores), the entropy, the
number of visible keys, the mean attention distance, the arg-max key and its weight, and the same
with key 0 removed and the row renormalised (`*_nobos`). Optional per-head gates scale each head's
output (0 = zero-ablation), batched as `[batch head]` so one launch runs one ablation per row.

The pattern `A[i,j] = exp(s_ij - L_i)` is never formed. Keys are visited in tiles with the online
softmax of FlashAttention (Dao et al., 2022): a running maximum `m`, and every running sum rescaled
by `exp(m_old - m_new)` when `m` grows. The sums kept per row are

    Z  = Σ_j e_j                  e_j = exp(s_j - m)
    S  = Σ_j e_j (s_j - m)        entropy = log Z - S / Z     (rescaled as S <- a(S + Δm Z) + ...)
    D  = Σ_j e_j |i - j|          distance = D / Z
    sink, prev, target = e_j at j = 0, i-1, t_i             (one masked sum each)
    Zn, Sn, Dn: the same without key 0                    (the `*_nobos` statistics)
    argmax: the key of the running maximum; its weight is exp(m - m) / Z = 1 / Z

and the output is `Σ_j e_j v_j / Z` (times the head's gate).

Roofline (SmolLM2's census shape, batch 8 x 1,024 tokens, 9 query heads over 3 KV heads, d_head 64,
causal, one layer). FLOPs: two dots over the causal half, 2 * 2 * 8*9*1024*1024/2*64 = 9.7 GFLOP with the
output (4.8 without `v`). Bytes: q 18.9 MB, k and v 6.3 MB each (re-read once per query tile, mostly
from L2), the output 18.9 MB, 10 sums x 4 B x 73,728 rows = 2.9 MB: about 54 MB, 12.5 us at the 4.3 TB/s
measured on an H200. Dots: fp32 in IEEE precision runs on the FMA pipes (~60 TFLOP/s): 0.16 ms; bf16 on
tensor cores: ~0.014 ms. What the kernel adds to FlashAttention is elementwise work and row reductions on
every score: per 64 x 64 tile five reductions (the max, three sums, the arg-max index) and ~30
elementwise ops per score, on ~40 M scores (the causal half plus the diagonal tiles). Reductions across
a tile's rows go through warp shuffles, so they, not memory or the dots, bound the kernel.
Measurements (H200 timings against the torch path, eager patterns and SDPA; the effect of each
change to the kernel) are in bench/results/kernels_h200.md and kernel_attention_stats_h200.txt.

Backward: the output is differentiable w.r.t. q, k, v and the gates. The Triton path recomputes the
gradient with a dense torch attention (O(n^2) memory in the backward only): the kernel is an analysis
kernel, and a flash backward is not needed by any headscope method today. The statistics carry no
gradient.
"""
import math
import torch
from torch import Tensor
from . import STAT_NAMES, has_triton, interpreting, pick

__all__ = ["STAT_NAMES", "attention_with_stats", "attention_with_stats_reference"]

_RAW = ("Z", "S", "D", "Zn", "Sn", "Dn", "cnt", "sink", "prev", "target")   # running sums, in kernel order

def _check(q, k, v, mask, targets, gates):
    "Validate shapes; return (batch, heads, q_pos, d_head, kv_heads, k_pos)"
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [batch head pos d_head], got q {tuple(q.shape)} and k {tuple(k.shape)}")
    b, h, nq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} must share batch and d_head with q {tuple(q.shape)}")
    nkv, nk = k.shape[1], k.shape[2]
    if nkv == 0 or h % nkv: raise ValueError(f"{h} query heads cannot share {nkv} key/value heads evenly.")
    if nk < nq: raise ValueError(f"k has {nk} positions, fewer than q's {nq}: the queries must be the last q_pos keys")
    if v is not None and v.shape != k.shape: raise ValueError(f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)}")
    if mask is not None and (mask.ndim != 4 or mask.shape[0] not in (1, b) or mask.shape[1] != 1 or mask.shape[2:] != (nq, nk)):
        raise ValueError(f"mask must be [batch|1 1 q_pos k_pos] = [{b}|1 1 {nq} {nk}], got {tuple(mask.shape)}")
    if targets is not None and not (tuple(targets.shape) == (b, nq) or (targets.ndim == 3 and tuple(targets.shape[:2]) == (b, nq))):
        raise ValueError(f"targets must be [batch q_pos] = [{b} {nq}] or [batch q_pos n_targets], got {tuple(targets.shape)}")
    if gates is not None and tuple(gates.shape) not in ((h,), (b, h)):
        raise ValueError(f"gates must be [head] = [{h}] or [batch head] = [{b} {h}], got {tuple(gates.shape)}")
    return b, h, nq, d, nkv, nk

def _bool_mask(mask:Tensor)->Tensor:
    "True where a query may see a key: bool masks as they are, additive masks where not ~-inf"
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2

def _gates_bh(gates:Tensor, b:int, h:int)->Tensor:
    "Gates as fp32 `[batch head]`, from `[head]` or `[batch head]`"
    return gates.float().expand(b, h)

def _finalize(raw:dict, arg:Tensor)->dict:
    "The statistics from the running sums (all `[batch head q_pos]`, fp32)"
    Z, Zn = raw["Z"], raw["Zn"]
    nz = Zn > 0
    Zs = torch.where(nz, Zn, torch.ones_like(Zn))
    per = lambda x, z: x / (z[..., None] if x.ndim > z.ndim else z)       # `target` may carry a last n_targets axis
    out = {"sink": raw["sink"] / Z, "prev": raw["prev"] / Z, "target": per(raw["target"], Z),
           "entropy": torch.log(Z) - raw["S"] / Z, "n_keys": raw["cnt"], "distance": raw["D"] / Z,
           "argmax": arg, "max_weight": 1 / Z,                                       # exp(m - m) / Z
           # renormalised without key 0; NaN where key 0 was the only key
           "entropy_nobos": torch.where(nz, torch.log(Zs) - raw["Sn"] / Zs, torch.nan),
           "distance_nobos": torch.where(nz, raw["Dn"] / Zs, torch.nan)}
    for n in ("prev", "target"):
        x = raw[f"{n}_nobos_num"]
        out[f"{n}_nobos"] = torch.where(nz[..., None] if x.ndim > nz.ndim else nz, per(x, Zs), torch.nan)
    return {n: out[n] for n in STAT_NAMES}

def attention_with_stats_reference(q:Tensor,                  # [batch head q_pos d_head] queries (after rotary)
                                   k:Tensor,                  # [batch kv_head k_pos d_head] keys (GQA: kv_head divides head)
                                   v:Tensor|None=None,        # [batch kv_head k_pos d_head] values; None: statistics only
                                   mask:Tensor|None=None,     # [batch|1 1 q_pos k_pos] bool (True = attend) or additive; None = causal
                                   scaling:float|None=None,   # default d_head**-0.5
                                   softcap:float|None=None,   # Gemma 2's tanh soft-capping of the scores
                                   targets:Tensor|None=None,  # [batch q_pos] key index per query for `target` (-1 = none), or
                                                              # [batch q_pos n_targets]: `target`/`target_nobos` then end in n_targets
                                   gates:Tensor|None=None,    # [head] or [batch head] output scale per head (0 = ablate)
                                   q_chunk:int=256,           # query tile (the Triton kernel caps its tiles at 64/128)
                                   k_chunk:int=1024,          # key tile
                                  )->tuple:                   # (out [batch head q_pos d_head] or None, {stat: [batch head q_pos]})
    "Pure-torch reference and CPU path: the same online softmax over `[q_chunk k_chunk]` tiles, in fp32"
    b, h, nq, d, nkv, nk = _check(q, k, v, mask, targets, gates)
    g, off = h // nkv, nk - nq                       # GQA group size; with a KV cache, query i sits at key position off+i
    scaling = d ** -0.5 if scaling is None else scaling
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    qg = q.float().reshape(b, nkv, g, nq, d)
    kf = k.float()
    vf = None if v is None else v.float()
    many = targets is not None and targets.ndim == 3
    tgt_all = torch.full((b, nq, 1), -1, dtype=torch.long, device=dev) if targets is None else targets.to(dev).long()
    if not many: tgt_all = tgt_all.reshape(b, nq, 1)
    nt = tgt_all.shape[-1]
    bm = None if mask is None else _bool_mask(mask.to(dev))
    gates = None if gates is None else gates.to(dev)
    raws, args, outs = [], [], []
    for q0 in range(0, nq, q_chunk):
        q1 = min(q0 + q_chunk, nq); c = q1 - q0
        qi = torch.arange(q0, q1, device=dev) + off                                # absolute query positions
        tgt = {"sink": torch.zeros(b, c, dtype=torch.long, device=dev), "prev": (qi - 1).expand(b, c),
               "target": tgt_all[:, q0:q1]}
        z = {n: torch.zeros(b, nkv, g, c, *((nt,) if n == "target" else ()), **f32) for n in _RAW}
        m = torch.full((b, nkv, g, c), -math.inf, **f32)
        arg = torch.zeros(b, nkv, g, c, dtype=torch.long, device=dev)
        acc = None if v is None else torch.zeros(b, nkv, g, c, d, **f32)
        hi = int(qi.max()) + 1 if mask is None else nk                           # causal: later keys are never seen
        for k0 in range(0, hi, k_chunk):
            k1 = min(k0 + k_chunk, hi)
            kj = torch.arange(k0, k1, device=dev)
            s = torch.einsum("bvgqd,bvkd->bvgqk", qg[:, :, :, q0:q1], kf[:, :, k0:k1]).mul_(scaling)
            if softcap is not None: s = torch.tanh(s / softcap) * softcap
            if bm is None:                                                          # causal: only tiles crossing the diagonal mask
                ok = (kj[None, :] <= qi[:, None])[None, None, None] if k1 - 1 > int(qi.min()) else None
            else: ok = bm[:, :, q0:q1, k0:k1][:, :, None]                           # [b|1 1 1 c kc]
            if ok is not None: s.masked_fill_(~ok, -math.inf)
            cm, ci = s.max(-1)                                                      # the tile's max and arg-max, one pass
            m_new = torch.maximum(m, cm)
            safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            a = torch.exp(m - safe)                                                 # rescales the old sums (0 when m was -inf)
            dm = torch.where(torch.isinf(m), torch.zeros_like(m), m - safe)
            sr = s.sub_(safe[..., None])                                            # s - m, in place (s is not needed again)
            e = sr.exp()                                                            # masked keys: exp(-inf) = 0
            if ok is not None: sr.masked_fill_(~ok, 0.)                             # 0 where masked (avoids 0 * inf)
            esr = e * sr
            # sums without key 0 first, then key 0 added: a row whose weight sits on key 0 keeps its *_nobos precise
            j0 = 1 if k0 == 0 else 0
            Zr, Sr = e[..., j0:].sum(-1), esr[..., j0:].sum(-1)
            if ok is None:                                                          # every key <= every query: Σ e (i-j) as a matvec,
                kr = (kj[j0:] - k0).float()                                         # offsets from the tile start bound the cancellation
                Dr = (qi - k0).float() * Zr - e[..., j0:] @ kr
            else: Dr = (e[..., j0:] * (qi[:, None] - kj[None, j0:]).abs().float()).sum(-1)
            if j0:
                e0 = e[..., 0]
                Z0, S0, D0 = Zr + e0, Sr + esr[..., 0], Dr + e0 * qi.float()
            else: Z0, S0, D0 = Zr, Sr, Dr
            z["S"] = a * (z["S"] + dm * z["Z"]) + S0
            z["Sn"] = a * (z["Sn"] + dm * z["Zn"]) + Sr
            z["Z"] = a * z["Z"] + Z0; z["Zn"] = a * z["Zn"] + Zr
            z["D"] = a * z["D"] + D0; z["Dn"] = a * z["Dn"] + Dr
            z["cnt"] += (k1 - k0) if ok is None else ok.sum(-1)
            for n, t in tgt.items():                                                 # gathered weights: one per query (and target)
                t3 = t if t.ndim == 3 else t[..., None]                              # [b c n_t]
                inside = (t3 >= k0) & (t3 < k1)
                idx = (t3 - k0).clamp(0, k1 - k0 - 1)[:, None, None].expand(b, nkv, g, c, t3.shape[-1])
                w = e.gather(-1, idx) * inside[:, None, None]
                z[n] = (a[..., None] * z[n] + w) if n == "target" else a * z[n] + w[..., 0]
            if acc is not None: acc = a[..., None] * acc + torch.einsum("bvgqk,bvkd->bvgqd", e, vf[:, :, k0:k1])
            arg = torch.where(cm > m, ci + k0, arg)
            m = m_new
        r = lambda x: x.reshape(b, h, c, *x.shape[4:])
        raw = {n: r(x) for n, x in z.items()}
        raw["prev_nobos_num"] = raw["prev"] * (tgt["prev"] != 0)[:, None]           # key 0 has no weight after renormalising
        raw["target_nobos_num"] = raw["target"] * (tgt["target"] != 0)[:, None]
        raws.append(raw); args.append(r(arg))
        if acc is not None: outs.append(r(acc) / raw["Z"][..., None])
    cat = lambda xs: torch.cat(xs, 2) if xs else None
    raw = {n: cat([x[n] for x in raws]) for n in raws[0]} if raws else {
        n: torch.empty(b, h, 0, *((nt,) if n.startswith("target") else ()), **f32) for n in (*_RAW, "prev_nobos_num", "target_nobos_num")}
    arg = cat(args) if args else torch.empty(b, h, 0, dtype=torch.long, device=dev)
    stats = {n: x.detach() for n, x in _finalize(raw, arg).items()}   # statistics carry no gradient (as the kernel's)
    if not many:
        for n in ("target", "target_nobos"): stats[n] = stats[n][..., 0]
    out = None
    if v is not None:
        out = cat(outs) if outs else torch.empty(b, h, 0, d, **f32)
        if gates is not None: out = out * _gates_bh(gates, b, h)[..., None, None]
        out = out.to(v.dtype)
    return out, stats

def attention_with_stats(q:Tensor, k:Tensor, v:Tensor|None=None, mask:Tensor|None=None, scaling:float|None=None,
                         softcap:float|None=None, targets:Tensor|None=None, gates:Tensor|None=None,
                         q_chunk:int=256, k_chunk:int=1024,
                         force:str|None=None,       # None (automatic), 'triton' or 'torch'
                        )->tuple:                   # (out or None, {stat: [batch head q_pos]})
    "Attention output and per-head row statistics: the Triton kernel on CUDA, the chunked torch reference elsewhere"
    ts = [t for t in (q, k, v) if t is not None]     # the compute tensors decide; targets/mask/gates follow q's device
    return pick("attention_with_stats", *ts, force=force)(q, k, v, mask, scaling, softcap, targets, gates, q_chunk, k_chunk)

def _dense_attention(q, k, v, mask, scaling, softcap, gates):
    "Plain differentiable attention (the O(n^2) pattern): the Triton path's backward recomputes through it"
    b, h, nq, d = q.shape
    nkv, nk = k.shape[1], k.shape[2]
    scaling = d ** -0.5 if scaling is None else scaling
    kk, vv = k.float().repeat_interleave(h // nkv, 1), v.float().repeat_interleave(h // nkv, 1)
    s = q.float() @ kk.transpose(-1, -2) * scaling
    if softcap is not None: s = torch.tanh(s / softcap) * softcap
    ok = (torch.arange(nk, device=q.device)[None] <= torch.arange(nk - nq, nk, device=q.device)[:, None])[None, None] \
         if mask is None else _bool_mask(mask)
    out = torch.softmax(s.masked_fill(~ok, -math.inf), -1) @ vv
    if gates is not None: out = out * _gates_bh(gates, b, h)[..., None, None]
    return out

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _softcap(s, cap):
        "cap * tanh(s / cap), with tanh from exp (no libdevice in the interpreter)"
        return cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))

    @triton.jit
    def _weight_at(qf, K, M, bi, kvh, rq, qi, rd, t, q_ok, m, NK, D, scaling, softcap,
                   skb, skh, skn, skd, smb, smq, smk, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        "exp(s_it - m_i) for one key index t_i per query (0 where t_i is out of range or not visible)"
        valid = q_ok & (t >= 0) & (t < NK)
        kr = tl.load(K + bi * skb + kvh * skh + t[:, None] * skn + rd[None, :] * skd,
                     mask=valid[:, None] & (rd[None, :] < D), other=0.0).to(tl.float32)
        st = tl.sum(qf * kr, 1) * scaling
        if HAS_SOFTCAP: st = _softcap(st, softcap)
        if HAS_MASK: valid = valid & (tl.load(M + bi * smb + rq * smq + t * smk, mask=valid, other=0) != 0)
        else: valid = valid & (t <= qi)
        return tl.where(valid, tl.exp(st - m), 0.0)

    @triton.jit
    def _attn_stats_kernel(Q, K, V, M, T, G, O, R, A,
                           H, NQ, NK, D, GROUP, OFF, scaling, softcap,
                           sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                           smb, smq, smk, stb, stq, sob, soh, son, sod, s_raw,
                           HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           HAS_TARGETS: tl.constexpr, HAS_GATES: tl.constexpr, LOWP: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program: BLOCK_Q queries of one (batch, query head); keys in BLOCK_K tiles, online softmax
        pid_q, pid_bh = tl.program_id(0), tl.program_id(1)
        bi, hi = pid_bh // H, pid_bh % H
        kvh = hi // GROUP
        rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)                  # query rows
        qi = rq + OFF                                                 # their absolute positions
        rd = tl.arange(0, BLOCK_D)
        q_ok = rq < NQ
        q = tl.load(Q + bi * sqb + hi * sqh + rq[:, None] * sqn + rd[None, :] * sqd,
                    mask=q_ok[:, None] & (rd[None, :] < D), other=0.0)
        if not LOWP: q = q.to(tl.float32)
        if HAS_TARGETS: tg = tl.load(T + bi * stb + rq * stq, mask=q_ok, other=-1)
        else: tg = tl.full((BLOCK_Q,), -1, tl.int64)
        ninf = float("-inf")
        m = tl.full((BLOCK_Q,), ninf, tl.float32)
        Z = tl.zeros((BLOCK_Q,), tl.float32); S = tl.zeros((BLOCK_Q,), tl.float32); Dd = tl.zeros((BLOCK_Q,), tl.float32)
        Zn = tl.zeros((BLOCK_Q,), tl.float32); Sn = tl.zeros((BLOCK_Q,), tl.float32); Dn = tl.zeros((BLOCK_Q,), tl.float32)
        cnt = tl.zeros((BLOCK_Q,), tl.float32)
        arg = tl.zeros((BLOCK_Q,), tl.int32)
        acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
        if HAS_MASK: hi_k = NK
        else: hi_k = tl.minimum(NK, pid_q * BLOCK_Q + BLOCK_Q + OFF)     # causal: later keys are never seen
        for k0 in range(0, hi_k, BLOCK_K):
            kj = k0 + tl.arange(0, BLOCK_K)
            k_ok = kj < NK
            kt = tl.load(K + bi * skb + kvh * skh + kj[None, :] * skn + rd[:, None] * skd,
                         mask=k_ok[None, :] & (rd[:, None] < D), other=0.0)          # [BLOCK_D BLOCK_K]
            if LOWP: s = tl.dot(q, kt)
            else: s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
            s = s * scaling
            if HAS_SOFTCAP: s = _softcap(s, softcap)
            ok = q_ok[:, None] & k_ok[None, :]
            if HAS_MASK:
                mv = tl.load(M + bi * smb + rq[:, None] * smq + kj[None, :] * smk, mask=ok, other=0)
                ok = ok & (mv != 0)
            else:
                ok = ok & (kj[None, :] <= qi[:, None])
            s = tl.where(ok, s, ninf)
            cm = tl.max(s, 1)
            m_new = tl.maximum(m, cm)
            safe = tl.where(m_new == ninf, 0.0, m_new)
            a = tl.exp(m - safe)                                       # 0 while m is -inf
            dm = tl.where(m == ninf, 0.0, m - safe)
            e = tl.exp(s - safe[:, None])                               # masked keys: 0
            sr = tl.where(ok, s - safe[:, None], 0.0)
            dist = tl.abs(qi[:, None] - kj[None, :]).to(tl.float32)
            # five row reductions per tile (max, three sums, the arg-max index): the statistics' whole cost
            sZ = tl.sum(e, 1); sS = tl.sum(e * sr, 1); sD = tl.sum(e * dist, 1)
            if k0 == 0:                                                # only the first tile holds key 0
                en = tl.where(kj[None, :] == 0, 0.0, e)
                nZ = tl.sum(en, 1); nS = tl.sum(en * sr, 1); nD = tl.sum(en * dist, 1)
            else:
                nZ = sZ; nS = sS; nD = sD
            S = a * (S + dm * Z) + sS
            Sn = a * (Sn + dm * Zn) + nS
            Z = a * Z + sZ
            Zn = a * Zn + nZ
            Dd = a * Dd + sD
            Dn = a * Dn + nD
            if HAS_MASK: cnt += tl.sum(ok.to(tl.float32), 1)
            ci = tl.min(tl.where(s == cm[:, None], kj[None, :], 2147483647), 1)   # the tile's first key at its max
            arg = tl.where(cm > m, ci, arg)
            if HAS_V:
                vt = tl.load(V + bi * svb + kvh * svh + kj[:, None] * svn + rd[None, :] * svd,
                             mask=k_ok[:, None] & (rd[None, :] < D), other=0.0)      # [BLOCK_K BLOCK_D]
                if LOWP: pv = tl.dot(e.to(vt.dtype), vt)
                else: pv = tl.dot(e, vt.to(tl.float32), input_precision="ieee")
                acc = acc * a[:, None] + pv
            m = m_new
        # sink, previous-token and target weights: one key per query, so read after the loop as
        # exp(s_t - m) from a gathered key row rather than as three masked sums in every tile
        safe = tl.where(m == ninf, 0.0, m)
        qf = q.to(tl.float32)
        sink = _weight_at(qf, K, M, bi, kvh, rq, qi, rd, tl.zeros((BLOCK_Q,), tl.int64), q_ok, safe, NK, D, scaling, softcap,
                          skb, skh, skn, skd, smb, smq, smk, HAS_MASK, HAS_SOFTCAP)
        prev = _weight_at(qf, K, M, bi, kvh, rq, qi, rd, (qi - 1).to(tl.int64), q_ok, safe, NK, D, scaling, softcap,
                          skb, skh, skn, skd, smb, smq, smk, HAS_MASK, HAS_SOFTCAP)
        targ = _weight_at(qf, K, M, bi, kvh, rq, qi, rd, tg.to(tl.int64), q_ok, safe, NK, D, scaling, softcap,
                          skb, skh, skn, skd, smb, smq, smk, HAS_MASK, HAS_SOFTCAP)
        if not HAS_MASK: cnt = tl.minimum(qi + 1, NK).to(tl.float32)  # causal: keys 0..i
        base = R + (bi * H + hi) * NQ + rq                            # raw sums: [stat batch head q_pos]
        tl.store(base + 0 * s_raw, Z, mask=q_ok); tl.store(base + 1 * s_raw, S, mask=q_ok)
        tl.store(base + 2 * s_raw, Dd, mask=q_ok); tl.store(base + 3 * s_raw, Zn, mask=q_ok)
        tl.store(base + 4 * s_raw, Sn, mask=q_ok); tl.store(base + 5 * s_raw, Dn, mask=q_ok)
        tl.store(base + 6 * s_raw, cnt, mask=q_ok); tl.store(base + 7 * s_raw, sink, mask=q_ok)
        tl.store(base + 8 * s_raw, prev, mask=q_ok); tl.store(base + 9 * s_raw, targ, mask=q_ok)
        tl.store(A + (bi * H + hi) * NQ + rq, arg.to(tl.int64), mask=q_ok)
        if HAS_V:
            o = acc / Z[:, None]
            if HAS_GATES: o = o * tl.load(G + bi * H + hi).to(tl.float32)
            tl.store(O + bi * sob + hi * soh + rq[:, None] * son + rd[None, :] * sod, o.to(O.dtype.element_ty),
                     mask=q_ok[:, None] & (rd[None, :] < D))

    def _pow2_at_least_16(n): return n >= 16 and (n & (n - 1)) == 0

    # GPU tiles (max query tile, max key tile, warps), picked by the H200 sweep (bench/results/kernels_h200.md)
    GPU_TILES = (64, 64, 4)
    GPU_TILES_LOWP = (64, 64, 8)

    def _tile(chunk:int, cap:int)->int:
        "The largest power of two <= min(chunk, cap), at least 16 (tl.dot's smallest tile)"
        return max(16, 1 << (max(int(min(chunk, cap)), 1).bit_length() - 1))

    def _launch(q, k, v, mask, scaling, softcap, targets, gates, q_chunk, k_chunk):
        b, h, nq, d, nkv, nk = _check(q, k, v, mask, targets, gates)
        dev = q.device
        interp = interpreting() and not q.is_cuda
        # GPU tiles: 64 x 64 keeps q, one K/V tile, the fp32 scores and the accumulator in registers;
        # the interpreter prefers few, large tiles (it runs programs one after another)
        lowp = q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype and not interp
        cap_q, cap_k, warps = (128, 128, 4) if interp else GPU_TILES_LOWP if lowp else GPU_TILES
        bq, bk = _tile(q_chunk, cap_q), _tile(k_chunk, cap_k)
        bd = max(16, triton.next_power_of_2(d))
        assert _pow2_at_least_16(bq) and _pow2_at_least_16(bk) and _pow2_at_least_16(bd), (bq, bk, bd)
        out_dtype = None if v is None else v.dtype
        if not lowp:                                                   # one dtype into tl.dot: fp32 unless all low precision
            q, k = q.float(), k.float()
            v = None if v is None else v.float()
        elif v is not None: v = v.to(q.dtype)
        scaling = d ** -0.5 if scaling is None else float(scaling)
        raw = torch.empty(len(_RAW), b, h, nq, dtype=torch.float32, device=dev)
        arg = torch.empty(b, h, nq, dtype=torch.long, device=dev)
        out = torch.empty(b, h, nq, d, dtype=out_dtype, device=dev) if v is not None else raw  # raw: a dummy pointer
        if mask is not None:
            mb = _bool_mask(mask.to(dev))[:, 0].to(torch.int8)                 # [batch|1 q_pos k_pos]
            smb = 0 if mb.shape[0] == 1 else mb.stride(0)
            smq, smk = mb.stride(1), mb.stride(2)
        else: mb, smb, smq, smk = raw, 0, 0, 0
        tg = targets.to(dev).long() if targets is not None else arg
        stb, stq = (tg.stride(0), tg.stride(1)) if targets is not None else (0, 0)
        gates = None if gates is None else gates.to(dev)
        gt = _gates_bh(gates, b, h).contiguous() if gates is not None else raw
        vv = v if v is not None else k
        if nq and b and h:
            grid = (triton.cdiv(nq, bq), b * h)
            _attn_stats_kernel[grid](q, k, vv, mb, tg, gt, out, raw, arg,
                                     h, nq, nk, d, h // nkv, nk - nq, scaling, float(softcap or 1.0),
                                     *q.stride(), *k.stride(), *vv.stride(), smb, smq, smk, stb, stq,
                                     *(out.stride() if v is not None else (0, 0, 0, 0)), b * h * nq,
                                     HAS_V=v is not None, HAS_MASK=mask is not None, HAS_SOFTCAP=softcap is not None,
                                     HAS_TARGETS=targets is not None, HAS_GATES=gates is not None, LOWP=lowp,
                                     BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps)
        rawd = dict(zip(_RAW, raw.unbind(0)))
        qi = torch.arange(nq, device=dev) + (nk - nq)
        t_prev = (qi - 1).expand(b, nq)
        t_tg = targets.to(dev).long() if targets is not None else torch.full((b, nq), -1, device=dev, dtype=torch.long)
        rawd["prev_nobos_num"] = rawd["prev"] * (t_prev != 0)[:, None]
        rawd["target_nobos_num"] = rawd["target"] * (t_tg != 0)[:, None]
        return (out if v is not None else None), _finalize(rawd, arg)

    class _AttentionWithStats(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, gates, mask, scaling, softcap, targets, q_chunk, k_chunk):
            out, stats = _launch(q, k, v, mask, scaling, softcap, targets, gates, q_chunk, k_chunk)
            ctx.save_for_backward(q, k, v, gates, mask)
            ctx.scaling, ctx.softcap = scaling, softcap
            ctx.mark_non_differentiable(*stats.values())
            return (out, *stats.values())

        @staticmethod
        def backward(ctx, g_out, *g_stats):
            q, k, v, gates, mask = ctx.saved_tensors
            with torch.enable_grad():
                ins = [t.detach().requires_grad_(need) if t is not None else None
                       for t, need in zip((q, k, v, gates), ctx.needs_input_grad[:4])]
                out = _dense_attention(ins[0], ins[1], ins[2], mask, ctx.scaling, ctx.softcap, ins[3])
                wrt = [t for t in ins if t is not None and t.requires_grad]
                gs = iter(torch.autograd.grad(out, wrt, g_out.float()))
            grads = [next(gs).to(t.dtype) if t is not None and t.requires_grad else None for t in ins]
            return (*grads, None, None, None, None, None, None)

    def attention_with_stats_triton(q:Tensor, k:Tensor, v:Tensor|None=None, mask:Tensor|None=None,
                                    scaling:float|None=None, softcap:float|None=None, targets:Tensor|None=None,
                                    gates:Tensor|None=None, q_chunk:int=256, k_chunk:int=1024)->tuple:
        "Triton version of `attention_with_stats_reference`, same signature; the output is differentiable"
        if targets is not None and targets.ndim == 3:                 # one launch per target column (the kernel keeps one)
            _check(q, k, v, mask, targets, gates)
            runs = [attention_with_stats_triton(q, k, v, mask, scaling, softcap, targets[..., i], gates, q_chunk, k_chunk)
                    for i in range(targets.shape[-1])]
            out, st = runs[0][0], dict(runs[0][1])
            for n in ("target", "target_nobos"): st[n] = torch.stack([r[1][n] for r in runs], -1)
            return out, st
        need_grad = torch.is_grad_enabled() and v is not None and any(
            t is not None and t.requires_grad for t in (q, k, v, gates))
        if not need_grad: return _launch(q, k, v, mask, scaling, softcap, targets, gates, q_chunk, k_chunk)
        _check(q, k, v, mask, targets, gates)
        res = _AttentionWithStats.apply(q, k, v, gates, mask, scaling, softcap, targets, q_chunk, k_chunk)
        return res[0], dict(zip(STAT_NAMES, res[1:]))

    __all__ += ["attention_with_stats_triton"]
