"""The shape of the house: data flows one way (models -> hooks and caches -> analyses -> views/widgets -> report),
no import cycle anywhere, kernels a leaf, and no module too long to read. Read from the source with `ast`."""
import ast, pathlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "headscope"
CORE = {"models", "tiny_encoders", "norms", "dispatch", "arch", "arch_specs", "arch_infer", "routing", "attention_ports", "tokens", "attention", "hooking", "interventions", "decompose", "cache", "results"}
ANALYSES = {"heads", "causal", "probes", "sae", "toys", "weights"}
TOP = {"report", "cli"}
PURE_FOR_VIEWS = {"tokens", "results", "arch", "causal.metrics", "views"}   # what a view may import: no model runs

def _modname(path):
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)

def _imports(path):
    "[(target module under headscope, at module level?)] for every import in `path`"
    tree, name = ast.parse(path.read_text()), _modname(path)
    pkg = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    top_level = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, (ast.If, ast.Try)) for c in ast.walk(n)}
    typing_only = {id(c) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test) for c in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only: continue     # `if TYPE_CHECKING:` imports are type hints, never run
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("headscope"): mod = node.module.removeprefix("headscope").lstrip(".")
            else: continue
            targets = [mod] if node.module else [f"{mod}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("headscope").lstrip(".") for a in node.names if a.name.startswith("headscope")]
        else: continue
        for t in targets: out.append((t, id(node) in top_level))
    return out

MODULES = {_modname(p): p for p in PKG.rglob("*.py") if p.name != "_modidx.py"}

def _family(mod):
    head = mod.split(".")[0]
    return head

def _resolve(t):
    "the module a target names (a name imported from a package counts as that package)"
    while t and t not in MODULES: t = t.rpartition(".")[0]
    return t

def test_no_import_cycle():
    graph = {m: {_resolve(t) for t, top in _imports(p) if top} - {"", m} for m, p in MODULES.items()}
    seen, stack, cycles = set(), [], []
    def visit(m):
        if m in stack: cycles.append(stack[stack.index(m):] + [m]); return
        if m in seen: return
        seen.add(m); stack.append(m)
        for n in graph.get(m, ()): visit(n)
        stack.pop()
    for m in graph: visit(m)
    assert not cycles, f"import cycles: {cycles[:3]}"

@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_flow_one_way(mod):
    fam = _family(mod)
    for t, top in _imports(MODULES[mod]):
        tf = _family(t)
        if not t or tf == "kernels": continue
        if fam in CORE:
            assert tf in CORE or tf == "", f"core module {mod} imports {t}"
        if fam == "data":   # data may name the metric it is scored by (pure tensor functions), nothing that analyses
            assert tf in CORE | {"data"} or t.startswith("causal.metrics"), f"data module {mod} imports {t}"
        if fam in ANALYSES and top:
            assert tf not in {"views", "widgets"} | TOP, f"analysis {mod} imports {t} at module level (views load lazily in _repr_html_)"
        if fam == "views":
            assert tf in PURE_FOR_VIEWS or t in PURE_FOR_VIEWS or tf == "views", f"view {mod} imports {t}: views draw results and never run a model"
        if fam == "widgets":
            assert tf not in TOP, f"widget {mod} imports {t}"

def test_kernels_are_a_leaf():
    for p in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level: mods = [node.module]
            elif isinstance(node, ast.Import): mods = [a.name for a in node.names]
            else: continue
            for m in mods:
                assert not m.startswith(("headscope", "transformers")), f"kernels/{p.name} imports {m}"

@pytest.mark.parametrize("mod", sorted(MODULES))
def test_modules_stay_small(mod):
    n = len(MODULES[mod].read_text().splitlines())
    assert n <= 320, f"headscope/{mod.replace('.', '/')}.py has {n} lines; split it along a real seam (about 300 at most)"
