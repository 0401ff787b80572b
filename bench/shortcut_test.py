"""The shortcut test of issue #24 (FastDiME's protocol with ground truth; nbs/17_compare.ipynb §7): collect the runs into one JSON and table.

The runs (resumable: rerunning a command continues it; `torchrun --nproc_per_node 2 -m spruce_nb.cli -- compare ...` shares the images):

    # 1. the classifiers: the zoo's plain recipe on cxr phantoms whose corner marker co-occurs with cardiomegaly at strength S
    for S in 1 0.5 0; do
      spruce train-classifier --data "phantoms:cxr@spurious=$S" --arch convnext_micro --epochs 10 --n-train 2000 --n-val 400 --n-test 1000 --device cpu --out RUNS/shortcut_s$S
      spruce fit-gmms --model RUNS/shortcut_s$S/classifier.pt --data "phantoms:cxr@spurious=$S" --n 2000 --out RUNS/shortcut_s$S/gmms.pt
      for T in 0 -1; do   # accuracy on marker-balanced and on anti-correlated test data
        spruce evaluate-classifier --ckpt RUNS/shortcut_s$S/classifier.pt --data "phantoms:cxr@spurious=$T" --split test --n 1000 --out RUNS/shortcut_s$S/eval_s$T
      done
    # 2. a model directory per classifier: its classifier.pt and gmms.pt beside the zoo's generator.pt and encoder.pt (links), DISC's DUQ for it,
    #    then every method on the same 50 marker-balanced held-out phantoms
      mkdir -p RUNS/shortcut_s$S/models && ln -sf ZOO/generator.pt ZOO/encoder.pt ZOO/ddpm.pt RUNS/shortcut_s$S/classifier.pt RUNS/shortcut_s$S/gmms.pt RUNS/shortcut_s$S/models/
      spruce train-consistency --model RUNS/shortcut_s$S/classifier.pt --kind duq --data "phantoms:cxr@spurious=$S" --n 2000 --half --run-dir RUNS/shortcut_s$S/duq_run --out RUNS/shortcut_s$S/models/duq.pt
      torchrun --nproc_per_node 2 -m spruce_nb.cli -- compare --methods spruce,pgd,latent-shift,disc --model-dir RUNS/shortcut_s$S/models \
        --data "phantoms:cxr:cardiomegaly-vs-normal@spurious=0" --n 50 --batch-size 10 --spruce-steps 50 --pti-steps 100 --pti-lr 1e-3 --lambda-image 1e-3 \
        --extractor classifier --out RUNS/shortcut_cmp_s$S
    done
    # (ACE: add ace to --methods; the zoo's DDPM, trained on marker-free 'phantoms:cxr', counts as the same image domain since dc8c69f)
    # 3. this collector
    python bench/shortcut_test.py --runs RUNS --out nbs/data/shortcut_cxr64.json

The zoo's recipe does not learn the default marker (a 20-pixel letter): even at S = 1 the classifier learns the heart. The second
run makes the marker 3 times larger (`marker=3`: 166 pixels, 4 % of a 64-px image), which the S = 1 classifier does rely on. It is the
same commands with `marker=3` added to every phantom string (`phantoms:cxr@spurious=$S,marker=3` for training, fit-gmms, DUQ and the
accuracies; `phantoms:cxr:cardiomegaly-vs-normal@spurious=0,marker=3` for compare, with `ace` in `--methods`), one process per
strength (`OMP_NUM_THREADS=1`), then

    python bench/shortcut_test.py --runs RUNS3 --out nbs/data/shortcut_cxr64_marker3.json
"""
import argparse, json, sys
from pathlib import Path

from spruce_nb.compare import SHORTCUT_STRENGTHS, shortcut_table, shortcut_markdown
from spruce_nb.core import dump_json


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', required=True, help='folder with shortcut_s{S}/ (classifier, eval_s0, eval_s-1) and shortcut_cmp_s{S}/ (spruce compare)')
    p.add_argument('--strengths', type=float, nargs='+', default=list(SHORTCUT_STRENGTHS))
    p.add_argument('--out', default=None, help='JSON to write (the table, the accuracies, the commands); the Markdown table is printed')
    a = p.parse_args(argv)
    runs, acc, cmds = {}, {}, {}
    for s in a.strengths:
        tag = f'{s:g}'
        d, c = Path(a.runs) / f'shortcut_s{tag}', Path(a.runs) / f'shortcut_cmp_s{tag}'
        rep = lambda f: json.loads(f.read_text()) if f.exists() else {}
        train = rep(d / 'report.json')
        acc[s] = {k: v for k, v in dict(in_distribution=train.get('accuracy'), balanced=rep(d / 'eval_s0' / 'report.json').get('accuracy'),
                                         anti=rep(d / 'eval_s-1' / 'report.json').get('accuracy')).items() if v is not None}
        if (c / 'comparison.json').exists():
            runs[s] = c
            cmds[tag] = json.loads((c / 'comparison.json').read_text()).get('command')
        else: print(f'{c}: no finished comparison yet; strength {tag} left out', file=sys.stderr)
    table = shortcut_table(runs, acc)
    md = shortcut_markdown(table)
    print(md)
    if a.out:
        with open(a.out, 'w') as f: dump_json(dict(table=table, accuracy={f'{s:g}': v for s, v in acc.items()}, commands=cmds, markdown=md), f, indent=1)
    return 0


if __name__ == '__main__': sys.exit(main())
