__version__ = "0.1.0"
"""headscope: Jupyter-first mechanistic interpretability for Hugging Face transformers.

The public surface is flat (`from headscope import load_model, run_with_cache, hooks`) and cheap to
import: submodules load on first use, and nothing here imports triton or widgets."""
import importlib

_LAZY = {
    "models": ["load_model", "tiny_model", "model_summary", "TINY_ARCHS", "byte_tokenizer", "embedded_gguf_path", "headscope_cache_dir"],
    "arch": ["model_hook_names", "resolve_names", "model_dims", "arch_spec", "act_name", "SUPPORTED_ARCHS"],
    "hooking": ["hooks", "run_with_hooks", "patch", "ablate", "scale", "add", "to_inputs", "HookContext"],
    "cache": ["run_with_cache", "estimate_cache", "ActivationCache"],
    "lens": ["top_predictions", "logit_lens"],
    "heads": ["head_census", "HeadCensus", "pattern_scores", "retrieval_scores", "ablation_scores", "head_dla",
              "attention_stats", "needle_tasks", "repeated_tokens", "text_tokens"],
    "report": ["write_report", "report_html"],
    "views.heads": ["attention_explorer_html", "head_heatmap_html", "AttentionExplorer", "HeadHeatmap", "head_views"],
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}
__all__ = sorted(_WHERE)

def __getattr__(name):
    if name in _WHERE:
        val = getattr(importlib.import_module(f"headscope.{_WHERE[name]}"), name)
        globals()[name] = val
        return val
    raise AttributeError(f"module 'headscope' has no attribute {name!r}")

def __dir__(): return sorted(list(globals()) + __all__)
