"""Vision head scores against independent references: brute-force loops in float64 over random patterns on irregular
grids with several prefix tokens, the grids of real HF vision models (token counts of a forward pass), and the
synthetic image task and tiny-ViT training of `headscope.data.images`."""
import math
import pytest
import torch

from headscope.heads.vision import PatchGrid, patch_grid, vision_head_scores, layer_patterns

def brute_scores(A, rows, cols, p0, radius):
    "distance, cls_mass, locality, entropy, self_mass per head of one layer [batch head q k], by plain loops over queries and keys"
    B, H, n, _ = A.shape
    pos = lambda t: divmod(t - p0, cols)
    out = []
    for h in range(H):
        ds, cs, ls, es, ss, nd = 0.0, 0.0, 0.0, 0.0, 0.0, 0
        for b in range(B):
            for i in range(p0, n):
                row = [float(v) for v in A[b, h, i]]
                cs += sum(row[:p0]); ss += row[i]; es += -sum(v * math.log(v) for v in row if v > 0) / math.log(n)
                m = sum(row[p0:])
                if m <= 1e-9: continue
                d = sum(row[j] * math.dist(pos(i), pos(j)) for j in range(p0, n)) / m
                near = sum(row[j] for j in range(p0, n) if math.dist(pos(i), pos(j)) <= radius + 1e-9) / m
                ds += d; ls += near; nd += 1
        q = B * (n - p0)
        out.append((ds / nd if nd else float("nan"), cs / q, ls / nd if nd else float("nan"), es / q, ss / q))
    return torch.tensor(out, dtype=torch.float64).T          # [5 head]

@pytest.mark.parametrize("rows,cols,p0", [(3, 5, 1), (4, 2, 2), (2, 3, 5)])
def test_scores_match_loops(rows, cols, p0):
    "Random patterns (some rows entirely on the prefix) on irregular grids: every score equals the float64 loops"
    g = torch.Generator().manual_seed(rows * 10 + cols)
    n = p0 + rows * cols
    A = (torch.randn(2, 3, 3, n, n, generator=g, dtype=torch.float64) * 2).softmax(-1)   # [layer batch head q k]
    A[0, :, 1, :, :p0] += 5; A[0, :, 1] /= A[0, :, 1].sum(-1, keepdim=True)                # a head leaning on the prefix
    A[1, 0, 2, p0 + 1] = 0; A[1, 0, 2, p0 + 1, 0] = 1                                        # one query wholly on CLS
    res = vision_head_scores(tuple(A), PatchGrid(rows, cols, p0), radius=1.0)
    for l in range(2):
        ref = brute_scores(A[l], rows, cols, p0, 1.0)
        got = torch.stack([res.distance[l], res.cls_mass[l], res.locality[l], res.entropy[l], res.self_mass[l]]).double()
        assert torch.allclose(got, ref, atol=1e-6), (l, got, ref)

def test_uniform_distance_brute_force():
    for rows, cols in ((8, 8), (5, 3), (1, 7), (14, 14)):
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        ref = sum(math.dist(a, b) for a in cells for b in cells) / len(cells) ** 2
        assert abs(PatchGrid(rows, cols).uniform_distance() - ref) < 1e-10

def test_sources_agree():
    "A tuple, a layer dict and hook names give the same scores, with the real layer indices"
    A = torch.rand(2, 1, 2, 17, 17).softmax(-1)
    g = PatchGrid(4, 4)
    a = vision_head_scores(tuple(A), g)
    b = vision_head_scores({f"blocks.{l * 3}.attn.hook_pattern": A[l] for l in range(2)}, g)
    assert torch.equal(a.distance, b.distance) and b.axis_index()["layer"] == [0, 3]
    assert b.top(1, "distance")[0].name.startswith(("L0H", "L3H"))

def test_known_toys_classes():
    "On itself -> local with distance 0, uniform -> global at the brute-force mean distance, on CLS -> prefix with mass 1"
    g = PatchGrid(6, 6)
    n = g.n_tokens
    A = torch.stack([torch.eye(n), torch.full((n, n), 1 / n), torch.eye(n)[[0] * n]]).double()[None]
    res = vision_head_scores(A, g)
    assert res.kinds() == [["local", "global", "prefix"]]
    assert res.distance[0, 0] == 0 and res.cls_mass[0, 2] == 1 and torch.isnan(res.distance[0, 2])
    assert abs(res.distance[0, 1].item() - g.uniform_distance()) < 1e-5
    assert "1 local, 0 hybrid, 1 global, 1 prefix" in repr(res)

def test_hf_models_token_counts():
    "The grids of real (tiny, untrained) HF vision models match their forward passes, DINOv2 at a non-default size included"
    from transformers import ViTConfig, ViTModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=24, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, attn_implementation="eager")).eval()
    with torch.no_grad(): out = vit(torch.rand(2, 3, 24, 24), output_attentions=True)
    g = patch_grid(vit.config)
    assert g == PatchGrid(6, 6, 1) and out.attentions[0].shape[-1] == g.n_tokens
    assert vision_head_scores(out.attentions, g).distance.shape == (1, 2)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(image_size=28, patch_size=7, hidden_size=16, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=32, num_register_tokens=3)).eval()
    with torch.no_grad(): h = dino(torch.rand(1, 3, 35, 21)).last_hidden_state
    assert h.shape[1] == patch_grid(dino.config, image_size=(35, 21)).n_tokens == 1 + 3 + 5 * 3

def test_bad_inputs():
    with pytest.raises(ValueError, match="the grid has 65"): vision_head_scores(torch.rand(1, 2, 10, 10), PatchGrid(8, 8))
    with pytest.raises(ValueError, match="q = k"): layer_patterns(torch.rand(1, 2, 10, 9))
    with pytest.raises(ValueError, match="No patch grid known"):
        from transformers import GPT2Config
        patch_grid(GPT2Config())

# ---------------------------------------------------------------- the synthetic task and a trained tiny ViT
from headscope.data.images import domino_task, partner_tokens, train_tiny_vit, tiny_vit, patchify, mask_patches

def test_domino_task_ground_truth():
    "Each patch's partner (from the block orientations) is the one other patch of its colour, read back from the pixels"
    t = domino_task(64, seed=3, noise=0.0)
    cols = patchify(t.images, t.patch).view(64, 64, 3, -1).mean(-1)            # [n n_patches 3] mean colour of each patch
    pt = partner_tokens(t) - 1
    same = (cols[:, :, None] - cols[:, None]).abs().amax(-1) < 1e-6            # [n patch patch]
    assert torch.equal(same.sum(-1), torch.full((64, 64), 2))                   # itself and exactly one other
    assert same.gather(2, pt[..., None]).all()
    assert torch.equal(domino_task(64, seed=3).images, domino_task(64, seed=3).images)

def test_untrained_vit_has_no_local_heads():
    "The control: at initialisation every head spreads its attention (relative distance near 1), so none is local"
    t = domino_task(32, seed=0)
    with torch.no_grad(): att = tiny_vit(t, seed=0)(t.images, output_attentions=True).attentions
    res = vision_head_scores(att, t.grid)
    assert res.counts()["local"] == 0 and (res.relative_distance - 1).abs().max() < 0.1

# Training (1,500 steps, about a minute) and what it grows are asserted by the tutorial nbs/tutorials/vision_heads.ipynb,
# through headscope's hook points: at least one local head (locality > 0.8) that sits on the partner, accuracy > 0.8.
