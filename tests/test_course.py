"""Course mode end to end: eight chapters, each shaped as a chapter; the instructor version runs and passes every check,
the student version runs every cell and fails each check with its friendly message; the notebooks are stored executed.

`run_notebooks.py` leaves nbs/course/ to this file (unless given it as --path): the chapters run here, once per version."""
import ast, json, re
from pathlib import Path
import nbformat, pytest
import test_tutorials as tt
from headscope.course.core import CHAPTERS, load_chapters
from headscope.course.export import course_notebook, notebook_report, is_solution_cell, is_hint_cell, chapter_of

ROOT = Path(__file__).parents[1]
COURSE = ROOT / "nbs" / "course"
CHAPTER_NBS = sorted(COURSE.glob("[0-9][0-9]_*.ipynb"))
STORED = CHAPTER_NBS + tt.TUTORIALS
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

def _exercises(n): return [e for e in load_chapters([n]).values() if e.chapter == n]

def test_eight_chapters_with_their_checks():
    assert sorted(CHAPTERS) == list(range(1, 9))
    assert [chapter_of(p) for p in CHAPTER_NBS] == list(range(1, 9)), [p.name for p in CHAPTER_NBS]
    names = []
    for n in CHAPTERS:
        exs = _exercises(n)
        fns, qs = [e for e in exs if e.kind == "function"], [e for e in exs if e.kind == "quiz"]
        assert 5 <= len(fns) <= 10, f"chapter {n} has {len(fns)} exercises (5-10 wanted)"
        assert 3 <= len(qs) <= 5, f"chapter {n} has {len(qs)} quiz questions (3-5 wanted)"
        assert all(e.hint.strip() for e in fns), f"chapter {n}: an exercise without a hint"
        names += [e.name for e in fns]
    dup = {x for x in names if names.count(x) > 1}
    assert not dup, f"exercise functions share names across chapters (check(fn) finds them by name): {dup}"

@pytest.mark.parametrize("path", CHAPTER_NBS, ids=lambda p: p.stem)
def test_chapter_shape(path):
    "Title, learning goals and a measured run time on top; every exercise defined, checked and explained; the quiz"
    nb, n = nbformat.read(path, as_version=4), chapter_of(path)
    top = "\n".join(c.source for c in nb.cells[:4] if c.cell_type == "markdown")
    assert re.match(rf"# Chapter {n}: \S", nb.cells[0].source), f"{path.name}: first cell is not '# Chapter {n}: ...'"
    assert "Learning goals" in top, f"{path.name}: no learning goals at the top"
    assert re.search(r"Run time: .*\d+ s measured", top), f"{path.name}: no measured run time at the top"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    for e in _exercises(n):
        if e.kind == "function":
            defs = [s for s in code if re.search(rf"^def {e.name}\(", s, re.M)]
            assert defs and "### BEGIN SOLUTION" in defs[0] and "### END SOLUTION" in defs[0], f"{path.name}: {e.id} {e.name} has no solution cell"
            assert any(re.search(rf"^check\({e.name}\b", s, re.M) for s in code), f"{path.name}: {e.name} is never checked"
        else: assert any(f'quiz("{e.id}", {e.name})' in s for s in code), f"{path.name}: quiz {e.id} is never asked"
    n_fn = sum(e.kind == "function" for e in _exercises(n))
    assert sum(map(is_solution_cell, nb.cells)) >= n_fn, f"{path.name}: fewer explained solutions than exercises"
    tt.test_public_api_only(path)
    tt.test_kernelspec(path)

def _run(path, tmp_path, student):
    nb = course_notebook(nbformat.read(path, as_version=4), student=student, chapter=chapter_of(path))
    nbformat.write(nb, tmp_path / path.name)
    return notebook_report(tmp_path / path.name, timeout=600)

@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTER_NBS, ids=lambda p: p.stem)
def test_instructor_version_passes_every_check(path, tmp_path):
    rows, errors = _run(path, tmp_path, student=False)
    assert not errors, f"{path.name}: cells raised: {errors}"
    assert rows and all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]

@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTER_NBS, ids=lambda p: p.stem)
def test_student_version_fails_kindly(path, tmp_path):
    "Nothing is solved: every check fails with 'not written yet' / 'no answer yet', and no cell crashes"
    stu = course_notebook(nbformat.read(path, as_version=4), student=True)
    assert not any("### BEGIN SOLUTION" in c.source or is_solution_cell(c) for c in stu.cells)
    stu = course_notebook(nbformat.read(path, as_version=4), student=True, chapter=chapter_of(path))
    n_hints = sum(map(is_hint_cell, stu.cells))
    assert n_hints >= len(_exercises(chapter_of(path))), f"{path.name} (student): {n_hints} hints for {len(_exercises(chapter_of(path)))} exercises"
    rows, errors = _run(path, tmp_path, student=True)
    assert not errors, f"{path.name} (student): cells raised: {errors}"
    assert len(rows) == len(_exercises(chapter_of(path)))
    bad = [r for r in rows if r["passed"] or not re.search(r"not written yet|no answer yet", r["message"])]
    assert not bad, bad

@pytest.mark.parametrize("path", STORED, ids=lambda p: p.stem)
def test_stored_executed_small_and_static(path):
    "Tutorials and the instructor course read without a kernel: outputs kept, static only, small"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    shown = [c for c in code if c.outputs]
    assert len(shown) >= len(code) / 2, f"{path.name}: {len(shown)} of {len(code)} code cells have outputs: store it executed (tests/store_outputs.py)"
    assert "widgets" not in nb.metadata, f"{path.name} stores widget state"
    outs = [o for c in code for o in c.outputs]
    assert not any(WIDGET_VIEW in o.get("data", {}) for o in outs), f"{path.name} stores a live widget view"
    kb = len(json.dumps([c.outputs for c in code])) / 1024
    assert kb <= 600, f"{path.name}: outputs take {kb:.0f} kB"
    assert not any(o.get("output_type") == "error" for o in outs), f"{path.name} was stored with an error"
    for c in code:
        if re.match(r"check\(|quiz\(", c.source.strip()):
            text = json.dumps(c.outputs)
            assert "\\u2713" in text or "✓" in text, f"{path.name}: stored output of `{c.source.strip()[:40]}` is not a pass"
