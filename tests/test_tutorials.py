"Tutorials as course material: they open in JupyterLab without a kernel dialog, teach with the public API only, state their run time, and end on their interactive view"
import ast, re
from pathlib import Path
import nbformat, pytest

TUTORIALS = sorted((Path(__file__).parents[1] / "nbs" / "tutorials").glob("*.ipynb"))
VIEWS = ("image_attention_html", "CircuitGraph", "SteeringPlayground", "FeatureBrowser", "head_views", ".explore(", "PatchingHeatmap", "AttentionExplorer", "AttributionGraphWidget")

def _code(nb): return [c.source for c in nb.cells if c.cell_type == "code" and c.source.strip()]

def test_there_are_tutorials(): assert len(TUTORIALS) >= 6

@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_kernelspec(path):
    ks = nbformat.read(path, as_version=4).metadata.get("kernelspec", {})
    assert ks.get("name") == "python3" and ks.get("language") == "python", f"{path.name}: no python3 kernelspec (JupyterLab asks 'Select Kernel')"

@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_public_api_only(path):
    "No private names of headscope, no test helpers: what a student copies must be what the library promises"
    for src in _code(nbformat.read(path, as_version=4)):
        tree = ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("fastcore"), f"{path.name} imports test helpers from {node.module}"
                if node.module.split(".")[0] == "headscope":
                    assert not any(a.name.startswith("_") for a in node.names), f"{path.name}: private import from {node.module}"
                    assert not any(p.startswith("_") for p in node.module.split(".")), f"{path.name}: private module {node.module}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert False, f"{path.name} reaches a private attribute .{node.attr}"

@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_run_time_stated_at_the_top(path):
    nb = nbformat.read(path, as_version=4)
    top = "\n".join(c.source for c in nb.cells[:3] if c.cell_type == "markdown")
    assert re.search(r"Run time: .*\d+ s measured", top), f"{path.name}: no measured run time in its first cells"

@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_ends_on_its_interactive_view(path):
    "The last code cell builds a view and shows it (its last line is an expression, not an assignment or assert)"
    last = _code(nbformat.read(path, as_version=4))[-1]
    assert any(v in last for v in VIEWS), f"{path.name}: the last code cell shows no interactive view"
    final = ast.parse(last).body[-1]
    assert isinstance(final, ast.Expr), f"{path.name}: the last code cell does not display its view (ends with {type(final).__name__})"
