__version__ = "0.1.0"
"""headscope: Jupyter-first mechanistic interpretability for Hugging Face transformers.

Cheap to import: no triton, no widgets. The public surface is flat."""
