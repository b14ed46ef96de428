"""How often does `kd_find` pick a candidate that cannot pay, and how often does it find one that does? On the digits
(16 px, split 60/20/20), a small CNN student whose starting weights each seed draws (as `kd_find_for_job` draws them),
`--calls` calls of `kd_find` per scenario, each on seeds of its own (call c: seeds 100c, 100c+1, 100c+2, and the next
integers where it adds seeds), 4 epochs (rungs of 2 and 4), default settings otherwise (`--max-seeds` sets max_seeds;
the kept calls of a verdict rule other than today's `RULE` are refused):
- `weak teacher`: the student's architecture trained for one epoch (about 20% accuracy) as the teacher; SoftTarget
  T=4 (which pays here: its soft targets smooth the labels) and DIST (which does not).
- `harmful loss`: a good teacher (a wider CNN) with losses that push the student away from it (minus the KL
  divergence, weight 0.2) or towards the next class (its logits rolled by one class, SoftTarget T=4).
- `good teacher, nothing pays`: the good teacher with SoftTarget T=4 (which costs this student points) beside the two
  harmful losses.
- `one pays`: the same, with DIST from the good teacher (which pays) among them.
Targets (issue 36): false picks (a candidate that does not pay) at most 5% of calls; a paying candidate picked in at
least 80% of the calls of a scenario that has one.
What each candidate truly gains is measured on the test split, outside kd_find, from 6 seeds of its own: a false pick
is the pick of a candidate whose test gain does not lie above zero (95% interval). Writes
bench/results/kd_find_null.md (per call: the pick and kd_find's verdict) as calls end; the calls are kept under
bench/out/kd_find_null, so a stopped run goes on from there.

    python bench/kd_find_null.py --calls 20 --threads 1
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from fastai.layers import ConvLayer, Flatten
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from scipy.stats import beta
from torch import nn

from accuracy import write_text
from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls, write_digits
from fastkd.files import atomic_write
from fastkd.kd_find import RULE, KDFindResult, kd_find
from fastkd.losses import DIST, SoftTarget
from fastkd.workflow import Reseed, seed_gain

ROOT = Path(__file__).resolve().parents[1]
LR, EPOCHS = 1e-2, 4
TRUTH_SEEDS = range(900, 906)  # the test-split truth of each candidate: seeds no kd_find call draws
MAX_SEEDS = inspect.signature(kd_find).parameters['max_seeds'].default


def small_cnn(width: int) -> nn.Sequential:
    "A CNN laid out as fastai's vision models: Sequential(body, head)"
    body = nn.Sequential(ConvLayer(3, width, stride=2), ConvLayer(width, 2 * width, stride=2),
                         ConvLayer(2 * width, 2 * width, stride=2), nn.AdaptiveAvgPool2d(1), Flatten())
    return nn.Sequential(body, nn.Linear(2 * width, 10))


def away_from_teacher(student_logits, teacher_logits):
    "Minus the KL divergence: training pushes the student away from the teacher"
    return -F.kl_div(F.log_softmax(student_logits, -1), F.softmax(teacher_logits, -1), reduction='batchmean')


class RolledSoftTarget(nn.Module):
    "SoftTarget at T=4 towards the teacher's logits moved one class on: it teaches the next class"
    def __init__(self):
        super().__init__()
        self.soft_target = SoftTarget(T=4)

    def forward(self, student_logits, teacher_logits):
        return self.soft_target(student_logits, teacher_logits.roll(1, dims=1))


def trained(dls, width: int, epochs: int, lr: float, seed: int) -> tuple[nn.Module, float]:
    """A model of `width` trained for `epochs` from `seed`, and its validation accuracy: the same in every process
    (`Reseed` sets the batch order, which the loaders' own generators, drawn when they were made, would vary)"""
    set_seed(seed, reproducible=True)
    learn = Learner(dls, small_cnn(width), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=Reseed(seed))
    return learn.model.eval(), float(learn.validate()[1])


def scenarios(dls) -> tuple[dict, dict]:
    "Each scenario's teacher and candidates, and the teachers' and the student alone's validation accuracy"
    good, good_acc = trained(dls, 32, 10, 1e-2, 0)
    weak, weak_acc = trained(dls, 8, 1, 1e-3, 0)
    _, alone_acc = trained(dls, 8, EPOCHS, LR, 0)
    harmful = {'away (w 0.2)': dict(loss=away_from_teacher, weight=0.2),
               'rolled soft T4': dict(loss=RolledSoftTarget(), weight=0.5)}
    found = {'weak teacher': (weak, {'soft T4': dict(loss=SoftTarget(T=4), weight=0.5),
                                     'dist': dict(loss=DIST(), weight=0.5)}),
             'harmful loss': (good, harmful),
             'good teacher, nothing pays': (good, {'soft T4': dict(loss=SoftTarget(T=4), weight=0.5), **harmful}),
             'one pays': (good, {'dist': dict(loss=DIST(), weight=0.5), 'soft T4': dict(loss=SoftTarget(T=4), weight=0.5),
                                 **harmful})}
    return found, dict(good_teacher=good_acc, weak_teacher=weak_acc, student_alone=alone_acc)


def start_weights(seed: int) -> dict:
    "The student's starting weights drawn from `seed`"
    set_seed(seed, reproducible=True)
    return small_cnn(8).state_dict()


def one_call(dls, teacher: nn.Module, candidates: dict, call: int, max_seeds: int = MAX_SEEDS) -> KDFindResult:
    "kd_find on the seeds of call `call`, each seed drawing the student's starting weights"
    seeds = (100 * call, 100 * call + 1, 100 * call + 2)
    learn = Learner(dls, small_cnn(8), metrics=accuracy)
    learn.model.load_state_dict(start_weights(seeds[0]))
    return kd_find(learn, teacher, candidates, epochs=EPOCHS, lr=LR, seeds=seeds, start_weights=start_weights,
                   max_seeds=max_seeds, show_progress=False, show_plot=False)


def test_gains(dls, test_dl, teacher: nn.Module, candidates: dict, seeds: range) -> dict[str, dict]:
    """What each candidate truly gains: its test accuracy minus the student alone's, trained from the same seeds (start
    weights and batches) outside kd_find, in points: mean, sample std and whether its 95% interval lies above zero"""
    scores = {}
    for name, kwargs in {'alone': None, **candidates}.items():
        for seed in seeds:
            learn = Learner(dls, small_cnn(8), metrics=accuracy)
            learn.model.load_state_dict(start_weights(seed))
            cbs = [Reseed(seed)] + ([KnowledgeDistillation(teacher, **kwargs)] if kwargs else [])
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(EPOCHS, LR, cbs=cbs)
            preds, targets = learn.get_preds(dl=test_dl)
            scores.setdefault(name, {})[seed] = float(accuracy(preds, targets))
    alone = pd.Series(scores.pop('alone'))
    return {name: {k: gain[k] for k in ('mean', 'std', 'ci_low', 'ci_high', 'shown')}
            for name, gain in ((name, seed_gain(alone, pd.Series(s))) for name, s in scores.items())}


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--calls', type=int, default=20, help='kd_find calls per scenario (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--scenarios', nargs='+', default=None, help='only these scenarios (processes side by side '
                        'may each take some: each keeps its calls in a file of its own)')
    parser.add_argument('--out', type=Path, default=ROOT/'bench'/'results'/'kd_find_null.md')
    parser.add_argument('--max-seeds', type=int, default=MAX_SEEDS, help="kd_find's max_seeds (default: its own, "
                        '%(default)s)')
    parser.add_argument('--kept', type=Path, default=ROOT/'bench'/'out'/'kd_find_null', help='the calls measured so far')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = 'python bench/kd_find_null.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    args.kept.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp)/'digits', size=16, valid_fraction=0.2, test_fraction=0.2, seed=42)
        dls = digits_dls(data, size=16, bs=64, seed=42, num_workers=0)
        test_files = sorted((data/'test').glob('*/*.png'))
        test_dl = dls.test_dl(test_files, with_labels=True)
        found, accuracies = scenarios(dls)
        print(accuracies, flush=True)
        for scenario, (teacher, candidates) in found.items():
            if args.scenarios and scenario not in args.scenarios: continue
            path = args.kept/f'{scenario.replace(",", "").replace(" ", "-")}-max{args.max_seeds}.json'
            kept = json.loads(path.read_text()) if path.exists() else dict(scenario=scenario, calls=[],
                                                                           max_seeds=args.max_seeds, rule=RULE)
            if kept.get('rule') != RULE: raise SystemExit(f'{path} holds calls of another verdict rule: move it away.')
            if 'truth' not in kept: kept['truth'] = test_gains(dls, test_dl, teacher, candidates, TRUTH_SEEDS)
            kept['accuracies'] = accuracies
            for call in range(args.calls):
                if any(c['call'] == call for c in kept['calls']): continue
                start = time.perf_counter()
                res = one_call(dls, teacher, candidates, call, args.max_seeds)
                kept['calls'].append(dict(call=call, pick=res.best, seconds=time.perf_counter() - start,
                                          final_seeds=int(res.table.seeds.max()), verdict=res.message))
                print(scenario, kept['calls'][-1], flush=True)
                atomic_write(path, lambda f: Path(f).write_text(json.dumps(kept, indent=1), encoding='utf-8'))
                everything = [json.loads(p.read_text()) for p in sorted(args.kept.glob('*.json'))]
                write_text(report(everything, command), args.out)


def rate(k: int, n: int) -> str:
    "k of n as a share, with its exact (Clopper-Pearson) 95% interval"
    low = beta.ppf(0.025, k, n - k + 1) if k else 0.
    high = beta.ppf(0.975, k + 1, n - k) if k < n else 1.
    return f'{k}/{n} = {k / n:.0%} (95% interval {low:.0%} to {high:.0%})' if n else '-'


def report(scenarios: list[dict], command: str) -> str:
    """Per scenario, how often kd_find picked what, against what each candidate gains on the test split: a false pick
    is a candidate whose test gain's interval does not lie above zero"""
    rates, lines, false, n_calls = [], [], {}, 0
    cuts = sorted({kept['max_seeds'] for kept in scenarios})
    for kept in scenarios:
        calls, truth = kept['calls'], kept['truth']
        pays = [name for name, gain in truth.items() if gain['shown']]
        gains = '; '.join(f'{name} {g["mean"]:+.1f} ± {g["std"]:.1f} points (interval {g["ci_low"]:+.1f} to '
                          f'{g["ci_high"]:+.1f}{", pays" if g["shown"] else ""})' for name, g in truth.items())
        said = []
        for cut in [kept['max_seeds']]:
            picks = [c['pick'] for c in calls]
            wrong = sum(pick is not None and pick not in pays for pick in picks)
            false[cut] = (false.get(cut, (0, 0))[0] + wrong, false.get(cut, (0, 0))[1] + len(picks))
            found = f', a paying candidate picked in {rate(sum(p in pays for p in picks), len(picks))}' if pays else ''
            said.append(f'max_seeds={cut}: false picks in {rate(wrong, len(picks))}{found}, no pick in '
                        f'{sum(p is None for p in picks)}')
        n_calls += len(calls)
        rates.append(f'- **{kept["scenario"]}**: test gains over {len(TRUTH_SEEDS)} seeds: {gains}. ' + '; '.join(said)
                     + '.')
        lines += [f'| {kept["scenario"]} | {kept["max_seeds"]} | {c["call"]} | {c["pick"] or "none"} | {c["final_seeds"]} | '
                  f'{c["seconds"]:.0f} | {c["verdict"]} |' for c in calls]
    accuracies = scenarios[0]['accuracies'] if scenarios else {}
    minutes = sum(c['seconds'] for kept in scenarios for c in kept['calls']) / 60
    overall = [f'- **All scenarios, max_seeds={cut}**: false picks in {rate(*false[cut])} of calls (target: at most '
               '5%).' for cut in cuts if cut in false]
    return '\n'.join([
        '# kd_find: false picks and found gains (digits)', '',
        f'Command: `{command}` ({torch.__version__}; '
        f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}).', '',
        'Validation accuracy of the teachers and of the student alone (seed 0, 4 epochs): '
        + ', '.join(f'{k.replace("_", " ")} {v:.3f}' for k, v in accuracies.items()) + '. What each candidate truly '
        f'gains: test accuracy over the student alone, trained outside kd_find from seeds {TRUTH_SEEDS.start} to '
        f'{TRUTH_SEEDS.stop - 1}; it pays where the 95% interval of its mean gain lies above zero.', '',
        *rates, *overall, '', f'{n_calls} calls, {minutes:.0f} minutes of kd_find.', '',
        '| scenario | max_seeds | call | pick | seeds at the last rung | seconds | verdict |',
        '|---|---|---|---|---|---|---|', *lines, ''])


if __name__ == '__main__': main()
