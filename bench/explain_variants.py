"""Quality and time of one `spruce explain` setting on the 32 phantoms of bench_explain.py: the design runs behind its default.

    OMP_NUM_THREADS=1 python bench/explain_variants.py NAME PTI_JSON CF_JSON [N] [--out nbs/data/explain_variants.json]

PTI_JSON / CF_JSON override `PTIConfig` / `CounterfactualConfig` fields, e.g. '{"steps": 100}' '{"lpips_net": "vgg"}'.
The row (means ± 95 % intervals, median wall and CPU seconds per counterfactual over chunks of 8) is added to the JSON file under NAME.
Timings here are not interleaved with anything: compare speed with bench_explain.py, quality here.
"""
import sys, json, statistics, argparse
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
import bench_explain as B
from spruce_nb.core import atomic_write
from spruce_nb.counterfactual import CounterfactualConfig
from spruce_nb.pti import PTIConfig

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('name'); ap.add_argument('pti'); ap.add_argument('cf'); ap.add_argument('n', type=int, nargs='?', default=32)
    ap.add_argument('--out', default='nbs/data/explain_variants.json')
    a = ap.parse_args()
    torch.set_num_threads(1)
    pti, cf = json.loads(a.pti), json.loads(a.cf)
    x, seeds = B.queries(a.n, B.ZOO_DIR / 'cxr64')
    res = {k: [] for k, _ in B.QUALITY}; secs, cpus = [], []
    for k in range(0, a.n, 8):
        dt, ex, cpu = B.run_chunk((pti, cf), x[k:k + 8], B.ZOO_DIR / 'cxr64')
        secs.append(dt / len(ex)); cpus.append(cpu / len(ex))
        for kk, v in B.quality(ex, seeds[k:k + 8]).items(): res[kk] += v
    row = dict(pti=PTIConfig(**pti).to_dict(), cf={k: v for k, v in CounterfactualConfig(**cf).to_dict().items()}, n=a.n,
               command=f"OMP_NUM_THREADS=1 python bench/explain_variants.py {a.name} '{a.pti}' '{a.cf}' {a.n}",
               seconds_per_cf=statistics.median(secs), cpu_seconds_per_cf=statistics.median(cpus), quality={k: dict(zip(('mean', 'ci95'), B.ci95(v))) for k, v in res.items()})
    out = Path(a.out); allr = json.loads(out.read_text()) if out.exists() else {}
    allr[a.name] = row
    with atomic_write(out, overwrite=True, mode='w') as f: json.dump(allr, f, indent=1)
    print(a.name, f"{row['seconds_per_cf']:.2f} s/CF (CPU {row['cpu_seconds_per_cf']:.2f})", ' '.join(f"{k}={v['mean']:.3f}±{v['ci95']:.3f}" for k, v in row['quality'].items()))

if __name__ == '__main__': main()
