"""Run nbs/90_edge_bench.ipynb's code cells in order in one Python process, with a profile's parameters injected after
the parameters cell (what papermill does), for a machine without papermill / a Jupyter kernel (the GPU image).
`display(x)` prints x; figures go to the notebook's `edge_out` folder (the notebook saves them there).

    EDGE_OUT=$OUT/e/edge PYTHONPATH=. python kernels/run_edge_notebook.py --profile edge [--set edge_budget_s=400 ...]

`--set name=value` overrides one of the profile's parameters (a Python literal, else the plain string), e.g. a shorter
budget when device time is short: `--set edge_budget_s=380 "edge_spec=train_s=60,draft_s=20,identity=False"`.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_cells(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text())
    out = []
    for c in nb['cells']:
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        lines = [l for l in src.splitlines() if not l.lstrip().startswith(('%', '!'))]   # no magics here
        out.append(('parameters' in c.get('metadata', {}).get('tags', []), '\n'.join(lines)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--profile', default='edge')
    ap.add_argument('--notebook', default=str(ROOT / 'nbs' / '90_edge_bench.ipynb'))
    ap.add_argument('--set', nargs='*', default=[], help="parameter overrides name=value (after the profile's)")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    from minicpm4_core.profiles import load_profile
    from minicpm4_core.runner import RUNNER_KEYS
    from minicpm4_core.profiles import parse_overrides
    params = {k: v for k, v in load_profile(a.profile, ROOT).items() if k not in RUNNER_KEYS}
    over = parse_overrides(a.set)
    params.update(over)
    ns = {'__name__': '__edge_notebook__', 'display': lambda *xs: [print(x.to_string() if hasattr(x, 'to_string')
                                                                         else x) for x in xs]}
    cells, t0 = code_cells(Path(a.notebook)), time.time()
    if not any(p for p, _ in cells): raise SystemExit(f"{a.notebook}: no cell tagged 'parameters'")
    failed = []
    for i, (is_params, src) in enumerate(cells):
        t = time.time()
        try:
            exec(compile(src, f'{Path(a.notebook).name}[cell {i}]', 'exec'), ns)
        except Exception:                     # a display cell must not cost the cells after it (they save files)
            import traceback
            traceback.print_exc()
            failed.append(i)
            print(f'[cell {i} FAILED after {time.time() - t:.1f} s]', flush=True)
            if is_params or i < 3: return 1   # without its parameters/imports nothing after can run
            continue
        if is_params:                                   # the profile's values override the notebook's defaults
            declared = {k for k in ns if not k.startswith('_')}
            unknown = sorted(set(over) - declared)
            if unknown: raise SystemExit(f"--set: {unknown} are not parameters of {Path(a.notebook).name} "
                                         f"(its parameters cell: {sorted(declared - {'display'})})")
            ns.update({k: v for k, v in params.items() if k in declared})
            print('parameters:', {k: v for k, v in params.items() if k in declared}, flush=True)
        last = src.strip().splitlines()[-1] if src.strip() else ''
        if last and not last.startswith((' ', '#')) and '=' not in last and not last.startswith(
                ('for ', 'if ', 'with ', 'def ', 'import ', 'from ', 'print(', 'assert ', 'del ', 'return')):
            try: val = eval(compile(last, 'last', 'eval'), ns)   # a bare expression ends the cell: show it
            except Exception: val = None
            if val is not None: ns['display'](val)
        print(f'[cell {i} done in {time.time() - t:.1f} s]', flush=True)
    print(f'notebook done in {time.time() - t0:.1f} s' + (f'; FAILED cells {failed}' if failed else ''), flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
