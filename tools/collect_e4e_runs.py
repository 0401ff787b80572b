"""Collect finished `spruce train-encoder` runs into one small JSON for 07_e4e (offsets and losses over training).

    python tools/collect_e4e_runs.py --run LABEL RUN_DIR "COMMAND" [--run ...] --out nbs/data/e4e_cxr64_runs.json

Per run: the label, the command that produced it, its E4EConfig (from the run's last.pt: λ_d-reg, steps, the
progressive schedule) and, every `--every` steps, the mean offset norms ||Δ_i||_2 and the loss terms.
"""
import argparse, json
from pathlib import Path

KEYS = ('l2', 'lpips', 'sim', 'adv', 'delta_reg', 'loss', 'stage')


def collect(label: str, run: Path, command: str, every: int) -> dict:
    from spruce_nb.core import load_checkpoint
    from spruce_nb.e4e import E4EConfig
    hist = json.loads((run / 'history.json').read_text())
    ck = load_checkpoint(run / 'last.pt')
    cfg = E4EConfig.from_dict(ck.config['e4e'])
    num_ws = 1 + max(int(k.split('_')[1]) for k in hist[0] if k.startswith('delta_') and k[6:].isdigit())
    keep = [h for h in hist if h['step'] % every == 0 or h is hist[-1]]
    rec = {'step': [h['step'] for h in keep]}
    for k in list(KEYS) + [f'delta_{i}' for i in range(1, num_ws)]:
        rec[k] = [round(float(h[k]), 5) if h.get(k) is not None else None for h in keep]
    return dict(label=label, command=command, run=str(run), lambda_delta=cfg.lambda_delta, max_steps=cfg.max_steps,
                schedule=cfg.schedule(num_ws), num_ws=num_ws, history=rec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', nargs=3, action='append', metavar=('LABEL', 'RUN_DIR', 'COMMAND'), required=True)
    p.add_argument('--every', type=int, default=20, help='keep one history record every this many steps')
    p.add_argument('--out', required=True)
    a = p.parse_args(argv)
    res = [collect(lbl, Path(d), cmd, a.every) for lbl, d, cmd in a.run]
    Path(a.out).write_text(json.dumps(res, indent=1) + '\n')
    for r in res:
        h = r['history']
        print(f"{r['label']}: λ_d-reg {r['lambda_delta']}, {r['max_steps']} steps, final l2 {h['l2'][-1]:.4f}, "
              f"final Σ||Δ_i|| {h['delta_reg'][-1]:.2f}")
    print(f'wrote {a.out}')


if __name__ == '__main__': main()
