"The flat public surface: every name resolves to its module's export, and `import headscope` stays cheap"
import importlib, subprocess, sys
import headscope

def test_flat_names_resolve_to_exports():
    for name, mod in headscope._WHERE.items():
        m = importlib.import_module(f"headscope.{mod}")
        assert name in m.__all__, f"headscope.{name} is not exported by headscope.{mod}"
        assert getattr(headscope, name) is getattr(m, name)

def test_analysis_entry_points_are_flat():
    for name in ["activation_patching", "attribution_patching", "edge_attribution_patching", "path_patching",
                 "direct_logit_attribution", "circuit_eval", "faithfulness_curve", "ablate_heads", "ioi_pairs", "fact_pairs",
                 "patching_heatmap_html", "circuit_graph_html", "head_census"]:
        assert name in headscope.__all__ and callable(getattr(headscope, name))

def test_unknown_name_errors():
    try: headscope.activation_patchin
    except AttributeError as e: assert "activation_patchin" in str(e) and "did you mean activation_patching" in str(e)
    else: raise AssertionError("no AttributeError")

def test_import_is_cheap():
    code = "import sys, headscope; print(sorted(m for m in ('triton', 'ipywidgets', 'matplotlib', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
