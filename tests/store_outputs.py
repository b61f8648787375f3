"""Execute notebooks in place and keep their outputs, so they read well on a file browser or a code host without a kernel.

Tutorials and the instructor course are stored executed. Only small static outputs are kept: text, HTML
(every headscope widget carries a static HTML copy of itself) and images; a live widget's view
(`application/vnd.jupyter.widget-view+json`, useless without its saved state) and widget state are dropped,
an HTML copy past `--max-output-kb` (a 270-head view) becomes a one-line note, and a notebook whose outputs
pass `--max-kb` is refused. Runs each notebook from its own folder, with
TRITON_INTERPRET=1 and one torch thread per process, as `make test` does.

    python tests/store_outputs.py nbs/tutorials nbs/course [--max-kb 600] [--max-output-kb 120]
"""
import argparse, json, os, sys, time
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

def static_outputs(outputs:list, max_output_kb:float=120)->list:
    "Outputs without live widget views; an HTML copy over `max_output_kb` replaced by a note; an output left with no data dropped"
    kept = []
    for o in outputs:
        if "data" in o:
            o["data"] = {k: v for k, v in o["data"].items() if k != WIDGET_VIEW}
            h = o["data"].get("text/html")
            kb = len(h if isinstance(h, str) else "".join(h or [])) / 1024
            if kb > max_output_kb:
                o["data"]["text/html"] = (f"<p><i>An interactive view, {kb:.0f} kB as a static page: too big to store in the notebook. "
                                          "Run the cell to see it (or save it with the view's to_html()).</i></p>")
            if not o["data"]: continue
        kept.append(o)
    return kept

def outputs_kb(nb)->float: return sum(len(json.dumps(c.get("outputs", []))) for c in nb["cells"] if c["cell_type"] == "code") / 1024

def store(path:Path, max_kb:float, max_output_kb:float=120)->float:
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    nb = read_nb(path)
    cwd = os.getcwd(); os.chdir(path.parent)
    try: CaptureShell(path.parent).run_all(nb, exc_stop=True)
    finally: os.chdir(cwd)
    for c in nb.cells:
        if c.cell_type == "code": c.outputs = static_outputs(c.get("outputs", []), max_output_kb)
    nb.metadata.pop("widgets", None)
    kb = outputs_kb(nb)
    if kb > max_kb:
        big = sorted(((len(json.dumps(c.outputs)) / 1024, i, c.source.strip().splitlines()[-1][:60]) for i, c in enumerate(nb.cells)
                      if c.cell_type == "code"), reverse=True)[:3]
        raise ValueError(f"{path}: outputs take {kb:.0f} kB, more than --max-kb {max_kb:g}: show less (a static view, fewer rows); "
                         "largest: " + "; ".join(f"cell {i} `{src}` {k:.0f} kB" for k, i, src in big))
    write_nb(nb, path)
    return kb

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="notebooks or folders")
    ap.add_argument("--max-kb", type=float, default=600, help="largest outputs a notebook may keep (default 600 kB)")
    ap.add_argument("--max-output-kb", type=float, default=120, help="an HTML output over this is stored as a note (default 120 kB)")
    a = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch; torch.set_num_threads(1)
    files = [f for p in map(Path, a.paths) for f in (sorted(p.glob("*.ipynb")) if p.is_dir() else [p])]
    failed = []
    for f in files:
        t0 = time.time()
        try: kb = store(f.resolve(), a.max_kb, a.max_output_kb)
        except ValueError as e: print(e); failed.append(f); continue
        print(f"{f}: executed in {time.time() - t0:.0f} s, outputs {kb:.0f} kB")
    files = [f for f in files if f not in failed]
    import subprocess
    for f in files: subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(f)], check=True)
    if failed: sys.exit(f"not stored: {', '.join(map(str, failed))}")

if __name__ == "__main__": main()
