"""Execute notebooks in place and keep their outputs, so they read well on a file browser or a code host without a kernel.

Tutorials and the instructor course are stored executed. Only small static outputs are kept: text, HTML
(every headscope widget carries a static HTML copy of itself) and images; a live widget's view
(`application/vnd.jupyter.widget-view+json`, useless without its saved state) and widget state are dropped,
and a notebook whose outputs pass `--max-kb` is refused. Runs each notebook from its own folder, with
TRITON_INTERPRET=1 and one torch thread per process, as `make test` does.

    python tests/store_outputs.py nbs/tutorials nbs/course [--max-kb 400]
"""
import argparse, json, os, sys, time
from pathlib import Path

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

def static_outputs(outputs:list)->list:
    "Outputs without live widget views; an output left with no data is dropped"
    kept = []
    for o in outputs:
        if "data" in o:
            o["data"] = {k: v for k, v in o["data"].items() if k != WIDGET_VIEW}
            if not o["data"]: continue
        kept.append(o)
    return kept

def outputs_kb(nb)->float: return sum(len(json.dumps(c.get("outputs", []))) for c in nb["cells"] if c["cell_type"] == "code") / 1024

def store(path:Path, max_kb:float)->float:
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    nb = read_nb(path)
    cwd = os.getcwd(); os.chdir(path.parent)
    try: CaptureShell(path.parent).run_all(nb, exc_stop=True)
    finally: os.chdir(cwd)
    for c in nb.cells:
        if c.cell_type == "code": c.outputs = static_outputs(c.get("outputs", []))
    nb.metadata.pop("widgets", None)
    kb = outputs_kb(nb)
    if kb > max_kb: raise SystemExit(f"{path}: outputs take {kb:.0f} kB, more than --max-kb {max_kb:g}: show less (a static view, fewer rows)")
    write_nb(nb, path)
    return kb

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="notebooks or folders")
    ap.add_argument("--max-kb", type=float, default=400, help="largest outputs a notebook may keep (default 400 kB)")
    a = ap.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch; torch.set_num_threads(1)
    files = [f for p in map(Path, a.paths) for f in (sorted(p.glob("*.ipynb")) if p.is_dir() else [p])]
    for f in files:
        t0 = time.time(); kb = store(f.resolve(), a.max_kb)
        print(f"{f}: executed in {time.time() - t0:.0f} s, outputs {kb:.0f} kB")
    import subprocess
    for f in files: subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(f)], check=True)

if __name__ == "__main__": main()
