"""Run every notebook as `nbdev_test` does, but each in a fresh process, so no notebook's memory adds to the next's.

`nbdev_test --n_workers 1` runs all notebooks in one worker process; what each leaves behind (models, caches,
allocator heap) piles up, to 15 GiB resident here. This runner uses nbdev's own `test_nb` with the same flags,
files and working directory, in a process pool whose workers each run one notebook and exit. It prints
`nbdev_test --timing`'s table, each notebook's peak resident memory, and the peak of all workers together
(sampled every 0.2 s from /proc).

    python tests/run_notebooks.py [--workers 1] [--path nbs/tutorials]
"""
import argparse, os, resource, sys, threading, time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
import multiprocessing as mp

def _one(fn:str, skip_flags, force_flags, basepath, threads:int):
    import torch
    from nbdev.test import test_nb
    torch.set_num_threads(threads)                      # workers x threads = cores: oversubscribed OpenMP spins
    t0 = time.time()
    ok, _ = test_nb(Path(fn), skip_flags=skip_flags, force_flags=force_flags, basepath=basepath)
    return fn, ok, time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB

def _rss_gib(pid:int)->float:
    try:
        with open(f"/proc/{pid}/status") as f: return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 2**20
    except (OSError, StopIteration): return 0.

class _Sampler(threading.Thread):
    "The peak, over time, of the summed resident memory of this process's descendants"
    def __init__(self): super().__init__(daemon=True); self.peak, self.stop = 0., threading.Event()
    def run(self):
        me = os.getpid()
        while not self.stop.wait(0.2):
            parent = {int(p): _ppid(int(p)) for p in os.listdir("/proc") if p.isdigit()}
            mine, grew = {me}, True
            while grew:                                  # every descendant: the pool's workers hang off its forkserver
                new = {p for p, pp in parent.items() if pp in mine} - mine
                mine |= new; grew = bool(new)
            self.peak = max(self.peak, sum(_rss_gib(p) for p in mine - {me}))

def _ppid(pid:int)->int:
    try:
        with open(f"/proc/{pid}/stat") as f: return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError): return -1

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1, help="notebooks run at once, each worker with cores/workers torch threads (make test: 2, which on 2 cores took 302 s against 799 s for 1)")
    ap.add_argument("--path", default=None, help="a notebook or folder (default: every notebook nbdev_test would run)")
    a = ap.parse_args()
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from nbdev.test import _keep_file
    cfg = get_config()
    files = [f.absolute() for f in sorted(nbglob(a.path, as_path=True)) if _keep_file(f, ".notest")]
    # the course runs in tests/test_course.py, once as the instructor's and once as the students' version
    if a.path is None: files = [f for f in files if f.parent.name != "course"]
    if not files: sys.exit(f"No notebooks to test under {a.path or cfg.nbs_path} (give a notebook or a folder).")
    # the slowest first, so the pool's tail is short; names from the last timing table would do, a size proxy is enough
    files.sort(key=lambda f: -f.stat().st_size if "tutorials" not in str(f) else -10**12)
    os.chdir(cfg.nbs_path)
    ctx = mp.get_context("forkserver")
    # the server imports these once and each worker is forked from it: a notebook starts in ~0.1 s instead of
    # re-importing torch and transformers (~4 s each, 67 notebooks); nothing runs a torch op before the fork
    ctx.set_forkserver_preload(["torch", "transformers", "headscope", "nbdev.test", "execnb.shell"])
    sampler = _Sampler(); sampler.start()
    t0, results = time.time(), []
    with ProcessPoolExecutor(a.workers, mp_context=ctx, max_tasks_per_child=1) as ex:
        threads = max(1, (os.cpu_count() or 1) // a.workers)
        futs = [ex.submit(_one, str(f), cfg.tst_flags.split(), [], cfg.config_path, threads) for f in files]
        for fu in as_completed(futs): results.append(fu.result())
    sampler.stop.set()
    failed = [Path(fn).name for fn, ok, *_ in results if not ok]
    for fn, ok, secs, peak in sorted(results, key=lambda r: -r[2]):
        print(f"{Path(fn).name}: {int(secs)} secs, peak {peak:.2f} GiB{'' if ok else '  FAILED'}")
    print(f"{len(results)} notebooks in {time.time() - t0:.0f} s with {a.workers} workers; "
          f"largest notebook peak {max(r[3] for r in results):.2f} GiB, all workers together at most {sampler.peak:.2f} GiB")
    if failed:
        sys.stderr.write("\nnbdev Tests Failed On The Following Notebooks:\n" + "=" * 50 + "\n\t" + "\n\t".join(failed) + "\n")
        sys.exit(1)
    print("Success.")

if __name__ == "__main__": main()
