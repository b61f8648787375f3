"""The README's Python code blocks run, in order, in one namespace (they use the embedded SmolLM2)."""
import re, pathlib, pytest

README = pathlib.Path(__file__).parent.parent / "README.md"

@pytest.mark.slow
def test_readme_python_blocks_run(smollm2, monkeypatch):
    import headscope
    monkeypatch.setattr(headscope, "load_model", lambda *a, **k: smollm2, raising=False)  # reuse the session's model
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    ns = {}
    for b in blocks: exec(compile(b, str(README), "exec"), ns)
    assert ns["ablated"] < ns["clean"]

def test_readme_names_the_test_command_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in README.read_text() and "make test" in ci
