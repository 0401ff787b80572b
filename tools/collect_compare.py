"""Collect finished `spruce compare` directories into one small JSON for the notebook and the README.

    python tools/collect_compare.py /work/scratch/compare_plain /work/scratch/compare_trades2 --out nbs/data/compare_cxr64.json

Per comparison: the classifier (from the recorded command's --classifier), and comparison.json as `spruce compare` wrote it
(protocol, methods, the combined table, paired differences, proxy–truth correlations, timings). Nothing is recomputed.
"""
import argparse, json, shlex
from pathlib import Path


def collect(d: Path) -> dict:
    rep = json.loads((d / 'comparison.json').read_text())
    a = shlex.split(rep.get('command') or '')
    return dict(classifier=a[a.index('--classifier') + 1] if '--classifier' in a else 'classifier.pt', **rep)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('dirs', nargs='+', help='`spruce compare --out` directories')
    p.add_argument('--out', required=True)
    a = p.parse_args(argv)
    runs = [collect(Path(d)) for d in a.dirs]
    Path(a.out).write_text(json.dumps(dict(runs=runs), indent=1, ensure_ascii=False) + '\n')
    print(f"wrote {a.out}: {', '.join(r['classifier'] for r in runs)}")


if __name__ == '__main__':
    main()
