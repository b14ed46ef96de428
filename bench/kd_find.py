"""Does `kd_find`'s pick pay as well as the best method chosen by hindsight? On the demo's digits (16 px, split
60/10/30, the demo's teacher XResNet-34/2 trained 1 + 12 epochs, student XResNet-18/16 trained 1 + 6 epochs at lr 1e-2):
every method row (SoftTarget T4, DIST, DKD, function matching, standardised SoftTarget T2) and the student alone from
the same seeds, scored on the test split (weighted F1); `kd_find_for_job` on the validation split, then its pick
trained from the same seeds. Targets (issue 21): the pick's mean test gain is at least 80% of the best row's, at a cost
of at most 8 student runs of that schedule. Writes bench/results/kd_find.md with the command that made it.

    python bench/kd_find.py --seeds 42 43 44 --threads 1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from fastai.callback.mixup import MixUp

from fastkd.callback import KnowledgeDistillation
from fastkd.cli import ARCHS
from fastkd.digits import digits_dls, write_digits
from fastkd.files import atomic_write
from fastkd.kd_find import _table, _verdict, kd_find_for_job
from fastkd.losses import DIST, DKD, SoftTarget
from fastkd.workflow import Schedule, scratch_learner, train_schedule, weighted_f1

ROWS = {'softtarget': dict(loss=SoftTarget(T=4), weight=0.5), 'dist': dict(loss=DIST(), weight=0.5),
        'dkd': dict(loss=DKD(), weight=0.5), 'fm': dict(loss=SoftTarget(T=4), weight=0.5, cbs=[MixUp]),
        'softtarget-std': dict(loss=SoftTarget(T=2, standardize=True), weight=0.5)}


def test_f1(learn, test_dl, y_true) -> float:
    preds, _ = learn.get_preds(dl=test_dl)
    return weighted_f1(y_true, preds.argmax(dim=1).numpy())


def student_run(dls, test_dl, y_true, arch, schedule: Schedule, cbs: list) -> tuple[float, float]:
    "Test F1 and seconds of one student trained from `schedule.seed` with `cbs`"
    learn = scratch_learner(dls, arch, schedule.seed, cbs=cbs)
    with learn.no_bar(), learn.no_logging(): seconds = train_schedule(learn, schedule)['seconds']
    return test_f1(learn, test_dl, y_true), seconds


def cbs_of(teacher, kwargs: dict) -> list:
    kwargs = dict(kwargs)
    extra = [cb() for cb in kwargs.pop('cbs', [])]
    return [KnowledgeDistillation(teacher, **kwargs), *extra]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[42, 43, 44])
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--teacher-epochs', type=int, default=12)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--rungs', type=int, nargs='+', default=None,
                        help="kd_find's rungs, epochs after the frozen one (default: half of --epochs, then --epochs)")
    parser.add_argument('--keep', type=float, default=0.25, help="kd_find's keep (default: %(default)s)")
    parser.add_argument('--early-seeds', type=int, default=1, help="kd_find's early_seeds (default: %(default)s)")
    parser.add_argument('--reuse-rows', action='store_true',
                        help='take the method rows from the measurements kept by an earlier run; run kd_find again')
    parser.add_argument('--rebuild', metavar='COMMAND', default=None,
                        help='rewrite the report from the measurements kept beside it, naming COMMAND as its maker')
    parser.add_argument('--out', type=Path, default=Path(__file__).parent/'results'/'kd_find.md')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = 'python bench/kd_find.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    if args.rebuild: return write(pd.read_pickle(kept(args)), args.rebuild, args)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits(Path(tmp)/'digits', size=16, valid_fraction=0.1, test_fraction=0.3, seed=42)
        dls = digits_dls(data, size=16, bs=64, seed=42, num_workers=0)
        test_files = sorted((data/'test').glob('*/*.png'))
        y_true = [dls.vocab.o2i[f.parent.name] for f in test_files]
        test_dl = dls.test_dl(test_files)
        teacher = scratch_learner(dls, ARCHS['xresnet34-half'], 42)
        with teacher.no_bar(), teacher.no_logging():
            train_schedule(teacher, Schedule(1, args.teacher_epochs, lr=1e-2, seed=42))
        teacher_f1 = test_f1(teacher, test_dl, y_true)
        print(f'teacher test F1 {teacher_f1:.4f}', flush=True)
        student = ARCHS['xresnet18-sixteenth']
        runs = [] if not args.reuse_rows else [
            run for run in pd.DataFrame(pd.read_pickle(kept(args))['runs']).to_dict('records')
            if not run['row'].startswith('kd_find')]  # the rows of an earlier run, to measure kd_find again
        for seed in args.seeds if not args.reuse_rows else []:
            schedule = Schedule(1, args.epochs, lr=1e-2, seed=seed)
            for name, kwargs in {'alone': None, **ROWS}.items():
                cbs = cbs_of(teacher, kwargs) if kwargs else []
                f1, seconds = student_run(dls, test_dl, y_true, student, schedule, cbs)
                runs.append(dict(row=name, seed=seed, test_f1=f1, seconds=seconds))
                print(runs[-1], flush=True)
        start = time.perf_counter()
        found = kd_find_for_job(dls, student, teacher, Schedule(1, args.epochs, lr=1e-2, seed=args.seeds[0]),
                                early_seeds=args.early_seeds, rungs=args.rungs, keep=args.keep)
        find_seconds = time.perf_counter() - start
        print(found["result"], flush=True)
        for seed in args.seeds:
            f1, seconds = student_run(dls, test_dl, y_true, student, Schedule(1, args.epochs, lr=1e-2, seed=seed),
                                      found['callbacks']())
            runs.append(dict(row=f'kd_find pick: {found["name"]}', seed=seed, test_f1=f1, seconds=seconds))
            print(runs[-1], flush=True)
    res = found['result']
    measured = dict(runs=pd.DataFrame(runs), trials=res.trials, find_seconds=find_seconds, teacher_f1=teacher_f1,
                    verdict=dict(confidence=res.confidence, looks=res.looks, look=res.look))
    pd.to_pickle(measured, kept(args))  # to rebuild the report without training again (--rebuild)
    write(measured, command, args)


def kept(args) -> Path:
    "Where the measurements behind a report are kept (outside the repository)"
    return Path(tempfile.gettempdir())/f'{args.out.stem}.pkl'


def write(measured: dict, command: str, args):
    text = report(**measured, command=command, args=args)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    print(f'written {args.out}')


ROW_OF = {'softtarget T4': 'softtarget', 'dist': 'dist', 'dkd': 'dkd', 'fm (mixup)': 'fm',
          'softtarget-std T2': 'softtarget-std'}  # kd_find's default candidates that are rows of this benchmark


def report(runs: pd.DataFrame, trials: pd.DataFrame, find_seconds: float, teacher_f1: float, verdict: dict,
           command: str, args) -> str:
    "The Markdown report: every row's test gain, kd_find's pick against the best row, its cost, its table and trials"
    alone = runs[runs.row == 'alone'].set_index('seed').test_f1
    rows = []
    for name, group in runs.groupby('row', sort=False):
        gains = 100 * (group.set_index('seed').test_f1 - alone)
        rows.append(dict(row=name, test_f1=f'{group.test_f1.mean():.4f} ± {group.test_f1.std():.4f}',
                         gain='' if name == 'alone' else f'{gains.mean():+.1f} ± {gains.std():.1f}',
                         mean_gain=gains.mean(), seconds=f'{group.seconds.mean():.0f}'))
    table = pd.DataFrame(rows)
    methods = table[~table.row.isin(['alone']) & ~table.row.str.startswith('kd_find')].set_index('row')
    best = methods.mean_gain.idxmax()
    pick = table[table.row.str.startswith('kd_find')].iloc[0]
    alone_seconds = runs[runs.row == 'alone'].seconds.mean()
    share = pick.mean_gain / methods.mean_gain[best] if methods.mean_gain[best] > 0 else float('nan')
    found = _table(trials, **verdict)  # at the confidence and look kd_find's verdict was taken
    picked, message = _verdict(trials, found, 'accuracy', **verdict)
    why = ('the lower end of its interval of the mean gain lay above zero' if picked else
           'no finalist showed a gain: the top-ranked candidate')
    epoch_runs = (trials.epochs + (trials.epochs >= args.epochs)).sum() / (1 + args.epochs)  # frozen: last rung
    kept = [f'| {row} | {methods.mean_gain[row]:+.1f} | {int(found.epochs[name])} | {100 * found.gain[name]:+.1f} |'
            for name, row in ROW_OF.items() if name in found.index and row in methods.index]
    lines = [
        '# kd_find on the digits demo', '',
        f'Command: `{command}` ({args.threads} torch thread(s) on a 2-core CPU machine).', '',
        f'Teacher XResNet-34/2 (1 + {args.teacher_epochs} epochs): test F1 {teacher_f1:.4f}. Student XResNet-18/16, '
        f'1 + {args.epochs} epochs at lr 1e-2, seeds {", ".join(map(str, args.seeds))}; test F1 weighted over '
        'classes, gains in points (100 x F1) over the student alone of the same seed, mean ± sample std over seeds.',
        '',
        '| row | test F1 | gain (points) | seconds per run |', '|---|---|---|---|',
        *[f'| {r.row} | {r.test_f1} | {r.gain} | {r.seconds} |' for r in table.itertuples()], '',
        f'**kd_find picked `{pick.row.split(": ", 1)[1]}`** ({why}): mean test gain {pick.mean_gain:+.1f} points '
        'against '
        f'{methods.mean_gain[best]:+.1f} for the best row (`{best}`): {share:.0%} of it (target: at least 80%).', '',
        f'Cost of kd_find: {len(trials)} trials, {epoch_runs:.1f} student runs of this schedule counted in epochs '
        f'(the frozen epoch of the last rung included, each trial\'s teacher forwards not), {find_seconds:.0f} s, i.e. '
        f'{find_seconds / alone_seconds:.1f} runs of the student alone in seconds ({alone_seconds:.0f} s each in the '
        'rows above). Target: at most 8.', '',
        f'kd_find\'s verdict: {message}', '',
        '## Did the early rungs drop the eventual winner?', '',
        f'| row | test gain, {len(args.seeds)} seeds (points) | last kd_find rung (epochs) '
        '| kd_find validation gain there (points) |',
        '|---|---|---|---|', *kept, '',
        '## kd_find\'s table (validation split, accuracy; gain in accuracy units)', '',
        _markdown(found), '',
        '## Every trial of kd_find', '',
        '| candidate | rung | epochs (+1 frozen at the last rung) | seed | valid accuracy | agreement | seconds |',
        '|---|---|---|---|---|---|---|',
        *[f'| {t.name} | {t.rung} | {t.epochs} | {t.seed} | {t.score:.4f} | {t.agreement:.4f} | {t.seconds:.0f} |'
          for t in trials.itertuples()], '',
        '## Every run of the rows', '', '| row | seed | test F1 | seconds |', '|---|---|---|---|',
        *[f'| {r.row} | {r.seed} | {r.test_f1:.4f} | {r.seconds:.0f} |' for r in runs.itertuples()], '']
    return '\n'.join(lines)


def _markdown(table: pd.DataFrame) -> str:
    lines = [['candidate', *table.columns], ['---'] * (len(table.columns) + 1),
             *[[str(i), *(f'{v:.4g}' if isinstance(v, float) else str(v) for v in row)]
               for i, row in zip(table.index, table.itertuples(index=False))]]
    return '\n'.join('| ' + ' | '.join(line) + ' |' for line in lines)


if __name__ == '__main__': main()
