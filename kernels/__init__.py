"""headscope.kernels: hand-written Triton kernels, each next to a pure-torch reference.

This folder installs as `headscope.kernels` (see `package_dir` in setup.py). It must never be
importable as a top-level `kernels`: that name belongs to Hugging Face's `kernels` package,
which transformers probes and imports.

The rules every op in this package follows:

1. Every kernel has a pure-torch reference with the same signature, `{op}_reference(...)`,
   and, when triton imports, a Triton version `{op}_triton(...)`. The reference is the
   specification: tests compare the two on irregular shapes, forward and backward.
2. The public op (`scale_rows`, ...) picks one of them through `pick`, the single dispatch
   point: the Triton version when triton imports and every tensor argument is on CUDA, the
   torch reference otherwise. CPU paths always use the reference unless Triton is forced.
3. `force="torch"` or `force="triton"` (an argument of `pick` and of every op, or the
   `force_backend` context manager for a whole block) overrides the rule. Forcing Triton
   with CPU tensors needs the Triton interpreter, `TRITON_INTERPRET=1`.
4. `TRITON_INTERPRET` is read by `@triton.jit` when a kernel is defined, that is when its op
   module is first imported: set it before importing anything from `headscope.kernels`
   (tests/conftest.py does, and `make test` sets it on the command line).
5. Importing this package imports only torch. Triton is imported the first time an op module
   is loaded (ops load lazily, on first attribute access or first `pick`); `HAS_TRITON` tries
   the import once, when first read.
"""
import contextlib, contextvars, functools, importlib, os, sys

if __name__ == "kernels":
    # This folder was found as a top-level `kernels` because the repository root is on sys.path (`nbdev_test` puts it
    # there; so does `python` started in the root). That name is Hugging Face's `kernels`, which transformers imports:
    # hand the import over to it, found on sys.path without the root, so transformers gets what it asked for.
    import importlib.machinery, importlib.util
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    del sys.modules["kernels"]
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels': the repository's kernels/ folder is `headscope.kernels`, "
                                  "not a top-level package", name="kernels")
    _hf = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _hf
    _spec.loader.exec_module(_hf)

import torch

__all__ = ["STAT_NAMES", "HAS_TRITON", "has_triton", "interpreting", "backend_for", "pick", "force_backend", "OPS",
           "scale_rows", "scale_rows_reference", "attention_with_stats", "attention_with_stats_reference",
           "sparse_decode", "sparse_decode_reference", "stat_topk", "stat_topk_reference"]

BACKENDS = ("triton", "torch")
# the per-row attention statistics of `attention_with_stats`, in the op's order; defined here (no triton import) so
# the head census (`headscope.heads`) reads the same names without loading a kernel module
STAT_NAMES = ("sink", "prev", "target", "entropy", "n_keys", "distance", "argmax", "max_weight",
              "prev_nobos", "target_nobos", "entropy_nobos", "distance_nobos")
# a module is never named like its op: importing a submodule sets the package attribute of its name,
# which would shadow the op (`headscope.kernels.sparse_decode` must stay the function)
OPS = {"scale_rows": "row_scale",                        # public op name -> module in this package that defines it
       "attention_with_stats": "attention_stats",        # flash-style attention + per-head row statistics (head census)
       "sparse_decode": "sae_decode",                    # TopK/BatchTopK SAE decode as a gather of k decoder rows
       "stat_topk": "stat_threshold"}                    # statistical top-k: a Gaussian-quantile threshold per row
_forced = contextvars.ContextVar("headscope_kernels_backend", default=None)

@functools.cache
def has_triton()->bool:
    "True when `import triton` works (tried once; a broken install counts as absent)"
    try: import triton  # noqa: F401
    except Exception: return False
    return True

def interpreting()->bool:
    "True when the Triton interpreter is on (`TRITON_INTERPRET=1`), so Triton kernels run on CPU tensors"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

def _check_force(force):
    if force not in (None, *BACKENDS): raise ValueError(f"force must be None, 'triton' or 'torch', not {force!r}")
    return force

def backend_for(*args, force:str|None=None)->str:
    "'triton' or 'torch': the backend `pick` would choose for these arguments (non-tensors are ignored)"
    force = _check_force(force) or _forced.get()
    if force == "torch": return "torch"
    ts = [a for a in args if isinstance(a, torch.Tensor)]
    on_cuda = bool(ts) and all(t.is_cuda for t in ts)
    if force == "triton":
        if not has_triton(): raise RuntimeError("Triton was forced but `import triton` fails: install it (`pip install triton`) or use force='torch'.")
        if not (on_cuda or interpreting()):
            raise RuntimeError("Triton was forced on CPU tensors: set TRITON_INTERPRET=1 before importing headscope.kernels "
                               "to run kernels in the Triton interpreter, or move the tensors to CUDA.")
        return "triton"
    return "triton" if on_cuda and has_triton() else "torch"

def _op_module(name):
    if name not in OPS: raise KeyError(f"unknown kernel op {name!r}; known: {sorted(OPS)}")
    return importlib.import_module(f"{__name__}.{OPS[name]}")

def pick(name:str, *args, force:str|None=None):
    "The implementation of op `name` to call on `args`: `{name}_triton` or `{name}_reference` (see `backend_for`)"
    mod, backend = _op_module(name), backend_for(*args, force=force)
    if backend == "torch": return getattr(mod, f"{name}_reference")
    fn = getattr(mod, f"{name}_triton", None)
    if fn is None: raise RuntimeError(f"op {name!r} has no Triton implementation in this process (is triton importable?)")
    return fn

@contextlib.contextmanager
def force_backend(backend:str):
    "Within the block, every op without its own `force=` uses `backend` ('triton' or 'torch')"
    if backend not in BACKENDS: raise ValueError(f"backend must be 'triton' or 'torch', not {backend!r}")
    token = _forced.set(backend)
    try: yield
    finally: _forced.reset(token)

def __getattr__(name):  # PEP 562: `HAS_TRITON` and the ops resolve on first access
    if name == "HAS_TRITON": return has_triton()
    for op, modname in OPS.items():
        if name in (op, f"{op}_reference", f"{op}_triton"):
            return getattr(importlib.import_module(f"{__name__}.{modname}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

def __dir__(): return sorted(set(globals()) | set(__all__))
