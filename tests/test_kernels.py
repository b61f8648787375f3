"""headscope.kernels: import with and without triton, dispatch rules, Triton vs torch reference.

The Triton tests run on CPU through the interpreter (TRITON_INTERPRET=1, set in conftest.py)
and on CUDA when there is one."""
import importlib.util, os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch

import headscope.kernels as K
from headscope.kernels import scale_rows, scale_rows_reference, pick, force_backend, backend_for

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(1, 7), (5, 37), (33, 130)]
triton_ok = pytest.mark.skipif(not K.HAS_TRITON or not (K.interpreting() or torch.cuda.is_available()),
                               reason="needs triton and either TRITON_INTERPRET=1 or a CUDA device")

def _run(*code, cwd):
    "Run the `code` pieces in a fresh interpreter from `cwd` (away from the repo root only the install is on sys.path)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    src = "\n".join(textwrap.dedent(c).strip("\n") for c in code)
    r = subprocess.run([sys.executable, "-c", src], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout

def test_import_with_triton():
    assert K.__name__ == "headscope.kernels"
    assert Path(K.__file__).resolve().parent == REPO/"kernels"
    assert K.HAS_TRITON == (importlib.util.find_spec("triton") is not None)

def test_import_is_cheap(tmp_path):
    "Importing the package imports torch only; triton waits for the first op"
    out = _run("""
        import sys, headscope.kernels as K
        print('triton' in sys.modules)
        """, cwd=tmp_path)
    assert out.split() == ["False"]

BLOCK_TRITON = {
    "sys.modules": "import sys; sys.modules['triton'] = None",
    "meta path finder": """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == 'triton' or name.startswith('triton.'): raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())""",
}

@pytest.mark.parametrize("how", list(BLOCK_TRITON))
def test_import_without_triton(how, tmp_path):
    "Where triton cannot be imported, HAS_TRITON is False, ops fall back to the reference and forcing Triton says why"
    out = _run(BLOCK_TRITON[how], """
        import torch, headscope.kernels as K
        from headscope.kernels import scale_rows, scale_rows_reference, pick
        assert K.HAS_TRITON is False
        x, s = torch.randn(5, 37), torch.randn(5)
        assert pick('scale_rows', x, s) is scale_rows_reference
        assert torch.equal(scale_rows(x, s), x * s[:, None])
        assert not hasattr(K, 'scale_rows_triton')
        try: scale_rows(x, s, force='triton')
        except RuntimeError as e: print('refused:', e)
        """, cwd=tmp_path)
    assert "refused: Triton was forced but `import triton` fails" in out

def test_dispatch_rules():
    x, s = torch.randn(3, 4), torch.randn(3)
    assert backend_for(x, s) == "torch"                      # CPU tensors: the reference
    assert pick("scale_rows", x, s) is scale_rows_reference
    assert backend_for(x, s, force="torch") == "torch"
    with force_backend("torch"): assert backend_for(x, s) == "torch"
    with pytest.raises(ValueError, match="force must be"): backend_for(x, force="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        with force_backend("cuda"): pass
    with pytest.raises(KeyError, match="unknown kernel op"): pick("nope", x)
    with pytest.raises(ValueError, match=r"x \[N, D\] and s \[N\]"): scale_rows(x, torch.randn(4))

def test_force_triton_on_cpu_needs_interpreter(monkeypatch):
    x, s = torch.randn(3, 4), torch.randn(3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if K.HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"): backend_for(x, s, force="triton")

@triton_ok
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_matches_reference(shape):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(*shape, generator=g).to(dev), torch.randn(shape[0], generator=g).to(dev)
    assert pick("scale_rows", x, s, force="triton") is K.scale_rows_triton
    with force_backend("triton"): y = scale_rows(x, s)
    torch.testing.assert_close(y, scale_rows_reference(x, s), rtol=0, atol=0)
    # non-contiguous input (a transposed view) and a strided scale vector
    xt, s2 = torch.randn(shape[1], shape[0], generator=g).to(dev).t(), torch.randn(2 * shape[0], generator=g).to(dev)[::2]
    torch.testing.assert_close(scale_rows(xt, s2, force="triton"), scale_rows_reference(xt, s2), rtol=0, atol=0)

@triton_ok
def test_triton_gradients_match_reference():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    x0, s0, gy = torch.randn(5, 37, generator=g), torch.randn(5, generator=g), torch.randn(5, 37, generator=g)
    grads = {}
    for backend in ("triton", "torch"):
        x, s = x0.to(dev).requires_grad_(), s0.to(dev).requires_grad_()
        scale_rows(x, s, force=backend).backward(gy.to(dev))
        grads[backend] = (x.grad, s.grad)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-6, atol=1e-6)

@triton_ok
def test_launcher_refuses_small_or_odd_tiles():
    from headscope.kernels.row_scale import _launch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, s = torch.randn(4, 20, device=dev), torch.randn(4, device=dev)
    for bn, bd in [(8, 32), (16, 24), (16, 8)]:
        with pytest.raises(AssertionError, match="powers of two >= 16"): _launch(x, s, block_n=bn, block_d=bd)
    torch.testing.assert_close(_launch(x, s, block_n=16, block_d=16), scale_rows_reference(x, s), rtol=0, atol=0)

def test_no_top_level_kernels_from_us(tmp_path):
    "Through the install, our kernels/ folder is `headscope.kernels` only, never a top-level `kernels` (Hugging Face's name)"
    out = _run(f"""
        import importlib.util
        from pathlib import Path
        import transformers, headscope.kernels
        spec = importlib.util.find_spec('kernels')
        print(spec is None or not Path(spec.origin or '').resolve().is_relative_to({str(REPO/'kernels')!r}))
        """, cwd=tmp_path)
    assert out.split()[-1] == "True"

def test_transformers_imports_hf_kernels_from_repo_root():
    """From the repo root (cwd on sys.path, as `nbdev_test`'s basepath or `python -m pytest` put it) our folder is found
    first as `kernels`; it hands the import to Hugging Face's package, so transformers' `from kernels import ...`
    (5.25 imports it with every model's activations) gets the real names and a model builds"""
    out = _run(f"""
        import sys, importlib.util
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        import transformers
        from transformers.utils.import_utils import is_kernels_available
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)
        transformers.AutoModelForMaskedLM.from_config(cfg)
        import kernels, headscope.kernels
        ours = Path(kernels.__file__).resolve().is_relative_to({str(REPO/'kernels')!r})
        hf = importlib.util.find_spec('kernels', None) is not None and not ours
        print(is_kernels_available() == hf, ours, callable(headscope.kernels.pick))
        """, cwd=REPO)
    assert out.split()[-3:] == ["True", "False", "True"], out

@pytest.mark.slow
def test_wheel_holds_every_subpackage(tmp_path):
    "A plain (non-editable) install carries every exported subpackage (sae, views, ...) and kernels/ as headscope.kernels"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(tmp_path/"site"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    want = {p.parent.name for p in (REPO/"headscope").glob("*/__init__.py")} | {"kernels"}
    got = {p.parent.name for p in (tmp_path/"site"/"headscope").glob("*/__init__.py")}
    assert want <= got, f"missing from the install: {sorted(want - got)}"
    assert (tmp_path/"site"/"headscope"/"kernels"/"attention_stats.py").exists()
    assert not (tmp_path/"site"/"kernels").exists()

def test_every_op_resolves_to_its_function():
    "Each public op is the function, also after its module was imported (no module is named like an op)"
    import importlib
    for op, modname in K.OPS.items():
        assert op != modname, f"module {modname!r} shadows op {op!r}"
        mod = importlib.import_module(f"headscope.kernels.{modname}")
        assert callable(getattr(K, op)) and getattr(K, op) is getattr(mod, op), op
        assert getattr(K, f"{op}_reference") is getattr(mod, f"{op}_reference")

def test_analyses_load_triton_lazily(tmp_path):
    "Importing the head census or the TopK SAE does not import triton; their first kernel call does"
    out = _run("""
        import sys, torch
        import headscope.heads.census, headscope.heads.stats, headscope.sae.topk
        print('triton' in sys.modules)
        from headscope.heads.stats import STAT_NAMES
        from headscope.kernels.attention_stats import STAT_NAMES as KERNEL_STAT_NAMES
        print(STAT_NAMES == KERNEL_STAT_NAMES)
        """, cwd=tmp_path)
    assert out.split()[-2:] == ["False", "True"]
