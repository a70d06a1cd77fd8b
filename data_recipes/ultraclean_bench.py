"""Throughput and kill-resume of the UltraClean recipe at a size (default 100 MB), written to one JSON.

    python data_recipes/ultraclean_bench.py --mb 100 --num-proc 2 --work runs/uc_bench \
        --json kernels/results/ultraclean/cpu-recipe-<date>/recipe.json

1. writes `--mb` MB of demo input (data_recipes/ultraclean.py --demo-mb: the real corpora, junk and duplicates planted;
   beyond one pass over the corpora every further document is a corrupted re-use, counted as `junk`);
2. runs the recipe once, uninterrupted, with `--num-proc` processes: wall seconds, CPU seconds of the whole process
   tree (getrusage of the children), MB/s of wall time and MB per CPU-second (what one process does; other load on
   the machine does not change it), and the 1-minute load average sampled during the run;
3. runs it again, SIGKILLs the whole process group once `--kill-after` stage-1 shards are on disk, resumes, and checks
   that the kept documents are exactly those of the uninterrupted run.
"""
import argparse
import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd, env) -> dict:
    "Run cmd to the end; wall and CPU seconds (its process tree) and the load average every 2 s meanwhile."
    loads, stop = [], threading.Event()

    def sample():
        while not stop.wait(2.0): loads.append(os.getloadavg()[0])
    th = threading.Thread(target=sample, daemon=True); th.start()
    c0, t0 = _cpu_children(), time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.time() - t0, _cpu_children() - c0
    stop.set(); th.join()
    if r.returncode: raise RuntimeError(f"recipe failed ({r.returncode}): {r.stderr[-2000:]}")
    return dict(wall_s=wall, cpu_s=cpu, load_avg_1min=dict(min=min(loads, default=None), max=max(loads, default=None),
                                                         mean=sum(loads) / len(loads) if loads else None),
                summary=json.loads(r.stdout.strip().splitlines()[-1]))


def _kept(out: Path) -> list:
    import pyarrow.parquet as pq
    return sorted(x for f in sorted((out / 'kept').glob('*.parquet')) for x in pq.read_table(f, columns=['doc_id']).column(0).to_pylist())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--mb', type=float, default=100)
    ap.add_argument('--num-proc', dest='num_proc', type=int, default=2)
    ap.add_argument('--work', default='runs/uc_bench', help='folder for the input and the two runs')
    ap.add_argument('--kill-after', dest='kill_after', type=int, default=4, help='stage-1 shards on disk before the kill')
    ap.add_argument('--json', help='write the record here')
    a = ap.parse_args(argv)
    if a.mb <= 0 or a.num_proc < 1 or a.kill_after < 1:
        raise SystemExit(f"--mb must be > 0, --num-proc and --kill-after >= 1; got {a.mb}, {a.num_proc}, {a.kill_after}")
    sys.path.insert(0, str(HERE))
    import ultraclean as R
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    files = R.make_demo(work / f'input-{a.mb:g}mb', a.mb)
    t_demo = time.time() - t
    truth: dict = {}
    for f in files:
        for line in open(f, encoding='utf-8'):
            k = json.loads(line)['truth']; truth[k] = truth.get(k, 0) + 1
    text_bytes = None
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = lambda out: [sys.executable, str(HERE / 'ultraclean.py'), '--files', *files, '--out', str(out),  # noqa: E731
                       '--num-proc', str(a.num_proc)]
    ref, kil = work / 'uninterrupted', work / 'killed'
    for d in (ref, kil): shutil.rmtree(d, ignore_errors=True)
    full = _run(cmd(ref), env)
    text_bytes = json.loads((ref / 'summary.json').read_text())['map']['bytes']
    mb = text_bytes / 1e6
    full.update(mb_per_s_wall=mb / full['wall_s'], mb_per_cpu_s=mb / full['cpu_s'])
    # the kill: SIGKILL to the process group (the main process and its datasets.map workers) mid stage 1
    t0 = time.time()
    p = subprocess.Popen(cmd(kil), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while len(glob.glob(str(kil / 'stage1' / 'shard-*.parquet'))) < a.kill_after:
            if p.poll() is not None: raise RuntimeError('the recipe ended before the kill; lower --kill-after')
            time.sleep(0.1)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    killed_at = time.time() - t0
    on_disk = sorted(x.name for x in (kil / 'stage1').glob('shard-*.parquet'))
    resumed = _run(cmd(kil), env)
    same = _kept(kil) == _kept(ref)
    rec = dict(input=dict(mb=mb, files=len(files), docs=sum(truth.values()), truth=truth, demo_seconds=t_demo,
                          note='real corpora (austen, brown, python_docs, gcide, nlp_corpus) in 150-word chunks, 35% '
                               'corrupted, 5% exact and 5% near duplicates; past one pass over the corpora every '
                               'document is a corrupted re-use (truth = junk)'),
               num_proc=a.num_proc, cores=os.cpu_count(), uninterrupted=full,
               kill=dict(after_s=killed_at, shards_on_disk=on_disk, summary_existed=(kil / 'summary.json').exists()),
               resume=dict(resumed, same_kept_docs=same),
               date=time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime()), python=sys.version.split()[0])
    line = (f"{mb:.1f} MB, {rec['input']['docs']:,} docs, {a.num_proc} processes: {full['wall_s']:.1f} s wall "
            f"({full['mb_per_s_wall']:.2f} MB/s), {full['cpu_s']:.1f} CPU-s ({full['mb_per_cpu_s']:.2f} MB per CPU-s), "
            f"load avg {full['load_avg_1min']['mean']:.2f} on {os.cpu_count()} cores | killed after {len(on_disk)} shards, "
            f"resumed in {resumed['wall_s']:.1f} s skipping {resumed['summary']['skipped']}: kept docs identical {same}")
    rec['line'] = line
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rec, indent=1))
    print(line)
    return rec


if __name__ == '__main__':
    main()
