"""Does `kd_find`'s pick pay on GTSRB 32x32 as well as the best method chosen by hindsight? The accuracy benchmark's
data and track split, teacher (the shared ResNet-34), student (`student_model`, 0.6% of the teacher's parameters),
learning rate, batch size and schedule (bench/accuracy.py: `fit_one_cycle` at 3e-3, batch 128, unfrozen, 4 epochs as
in bench/results/accuracy.md). Steps, each kept in OUT (`--out`) as it ends so that a stopped run goes on from there,
and the report rewritten after each:
1. `kd_find` with its default candidates on the validation split (seed 0 chooses the finalists at a rung of half the
   schedule, seeds 1 and 2, and more while the verdict is open, judge them at all of it), its cost counted in student runs of the schedule (epochs) and in seconds;
2. the student alone and kd_find's pick (its best, else its top candidate), each trained from `--seeds` and scored on
   the test part (weighted F1);
3. every other default candidate from the same seeds, in the order of accuracy.md's gains, best first.
Targets (issue 21): the pick's mean test gain is at least 80% of the best candidate's, at a cost of at most 8 student
runs. Every image is decoded once (`fastkd.memory.in_memory`, the accuracy benchmark's `--in-memory`), which makes the
runs cheap enough for a CPU; its batches differ from those of accuracy.md, so the rows are measured again here.

    python bench/kd_find_gtsrb.py --threads 2       # writes bench/results/kd_find-gtsrb.md
    python bench/kd_find_gtsrb.py --quick           # smoke run: 3 classes, 2 epochs, 2 seeds, under bench/out
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pandas as pd
import torch
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torchvision.models import resnet34

from accuracy import (OUT, QUICK_CLASSES, ROOT, TEACHER, Scorer, fitnet_hint, prepared_data, student_model,
                      trained_student)
from fastkd.callback import load_teacher
from fastkd.files import atomic_write
from fastkd.gtsrb import gtsrb_dls
from fastkd.kd_find import KDFindResult, StaleRecord, kd_candidates, kd_find
from fastkd.memory import in_memory
from fastkd.split import default_split
from fastkd.workflow import seed_gain

# kd_find's default candidates and the rows of bench/results/accuracy.md with the same method and setting
TABLE_ROWS = {'dist + hint': '+ DIST + FitNet hint', 'dist': '+ DIST', 'softtarget-std T2':
              '+ SoftTarget, standardized logits', 'softtarget T4': '+ SoftTarget', 'fm (mixup)':
              '+ function matching (MixUp + SoftTarget)', 'dkd': '+ DKD'}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help=f'smoke run: classes {QUICK_CLASSES}, 2 epochs, seeds '
                        '0 1, the results under --out')
    parser.add_argument('--epochs', type=int, default=None, help='the planned schedule (default: 4; 2 with --quick)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='seeds of the test runs (default: 0 1 2)')
    parser.add_argument('--find-seeds', type=int, nargs='+', default=[0, 1, 2],
                        help="kd_find's seeds: the first chooses the finalists, the others judge them (default: 0 1 2)")
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--bs', type=int, default=128)
    parser.add_argument('--width', type=int, default=24)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--workers', type=int, default=0, help='workers that decode the images once (default: 0)')
    parser.add_argument('--data', type=Path, default=None, help='data folder (default: bench/out/accuracy/data)')
    parser.add_argument('--out', type=Path, default=None, help='kept runs (default: bench/out/kd_find-gtsrb)')
    parser.add_argument('--results', type=Path, default=None,
                        help='the report (default: bench/results/kd_find-gtsrb.md; OUT/kd_find-gtsrb.md with --quick)')
    parser.add_argument('--teacher-weights', type=Path, default=TEACHER)
    parser.add_argument('--runs-from', type=Path, default=None,
                        help="the test runs of an earlier report (its 'Every test run' table): only kd_find runs again, "
                        'and rows already there are not trained again')
    args = parser.parse_args(argv)
    args.classes = QUICK_CLASSES if args.quick else None
    args.epochs = args.epochs or (2 if args.quick else 4)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    args.out = (args.out or OUT/('kd_find-gtsrb-quick' if args.quick else 'kd_find-gtsrb')).resolve()
    args.data = (args.data or OUT/('accuracy-quick' if args.quick else 'accuracy')/'data').resolve()
    args.results = (args.results or (args.out/'kd_find-gtsrb.md' if args.quick else
                                     ROOT/'bench'/'results'/'kd_find-gtsrb.md')).resolve()
    return args


def table_gains(path: Path) -> dict[str, str]:
    "Row label -> 'gain (points)' of bench/results/accuracy.md (as written there)"
    lines = [line for line in path.read_text(encoding='utf-8').splitlines() if line.startswith('| ')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]
    return {row[0]: row[header.index('gain (points)')] for row in rows if len(row) == len(header)}


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = ' '.join(['python bench/kd_find_gtsrb.py', *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    dls = in_memory(gtsrb_dls(prepared_data(args.data, args.classes), size=32, bs=args.bs, classes=args.classes,
                              num_workers=args.workers))
    teacher = load_teacher(args.teacher_weights, resnet34, 43)
    scorer = Scorer(dls, args.data, args.classes, [0])
    set_seed(args.find_seeds[0], reproducible=True)
    learn = Learner(dls, student_model(args.width), metrics=accuracy, splitter=default_split)
    candidates = kd_candidates(learn, teacher)
    kept = args.out/'kd_find.json'
    found = None
    if kept.exists():
        try: found = KDFindResult.from_record(json.loads(kept.read_text()), candidates, teacher)
        except StaleRecord: print('the kept kd_find result is of an older rule: measuring again', flush=True)
    if found is None:
        found = kd_find(learn, teacher, candidates, epochs=args.epochs, lr=args.lr, seeds=args.find_seeds)
        write(json.dumps(found.record()), kept)
    print(found, flush=True)
    pick = found.best or found.top
    runs_file = args.out/'runs.csv'
    runs = pd.read_csv(runs_file).to_dict('records') if runs_file.exists() else \
        earlier_runs(args.runs_from) if args.runs_from else []
    table_gain = table_gains(ROOT/'bench'/'results'/'accuracy.md')
    points = {name: float(table_gain[row].split()[0]) for name, row in TABLE_ROWS.items() if row in table_gain}
    order = sorted(candidates, key=lambda name: (name != pick, -points.get(name, -100)))  # pick, then table's best
    for name in ['alone', *order]:
        for seed in args.seeds:
            if any(r['row'] == name and r['seed'] == seed for r in runs): continue
            cbs = [] if name == 'alone' else found.callback(name)
            student, seconds = trained_student(dls, cbs, seed, args.epochs, args.lr, args.width)
            runs.append(dict(row=name, seed=seed, seconds=seconds, **scorer.test(student, 0)))
            print(runs[-1], flush=True)
            atomic_write(runs_file, lambda tmp: pd.DataFrame(runs).to_csv(tmp, index=False))
            write(report(found, pick, pd.DataFrame(runs), table_gain, args, command), args.results)  # if stopped
    write(report(found, pick, pd.DataFrame(runs), table_gain, args, command), args.results)
    print(f'written {args.results}')


def write(text: str, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))


def count(value) -> str: return '-' if value is None or pd.isna(value) else f'{value:.0f}'


def earlier_runs(path: Path) -> list[dict]:
    "The rows of the 'Every test run' table of an earlier report"
    text = path.read_text(encoding='utf-8').split('## Every test run', 1)[1]
    rows = [[cell.strip() for cell in line.strip().strip('|').split('|')] for line in text.splitlines()
            if line.startswith('| ') and not line.startswith('| row ')]
    return [dict(row=row, seed=int(seed), test_f1=float(f1), seconds=float(seconds)) for row, seed, f1, seconds in rows]


def hint_pairs(candidates: dict) -> list[str]:
    "Which layers the default hint candidate joined (`match_layers`), as a line of the report"
    hints = [(name, hint) for name, kwargs in candidates.items() for hint in kwargs.get('hints', [])]
    row = fitnet_hint()
    return [f'`{name}`: FitNet hint from the student\'s layer {hint.student_layer!r} to the teacher\'s '
            f'{hint.teacher_layer!r} (accuracy.md\'s hint row: {row.student_layer!r} to {row.teacher_layer!r}).'
            for name, hint in hints] + [''] * bool(hints)


def report(found: KDFindResult, pick: str, runs: pd.DataFrame, table_gain: dict[str, str], args, command: str) -> str:
    "The Markdown report: each candidate's test gain over the student alone, the pick against the best, kd_find's cost"
    alone = runs[runs.row == 'alone'].set_index('seed')
    lines, gains = [], {}
    for name, group in runs.groupby('row', sort=False):
        f1 = group.set_index('seed').test_f1
        if name == 'alone':
            lines.append(f'| alone | {len(f1)} | {f1.mean():.4f} ± {f1.std():.4f} | | | | | '
                         f'{group.seconds.mean():.0f} |')
            continue
        gain = seed_gain(alone.test_f1.reindex(f1.index), f1)
        gains[name] = gain['mean']
        trial = found.table.loc[name]  # every candidate ran at least the first rung
        lines.append(f'| {name}{" (pick)" * (name == pick)} | {len(f1)} | {f1.mean():.4f} ± {f1.std():.4f} '
                     f'| {gain["mean"]:+.1f} ± {gain["std"]:.1f} | {table_gain.get(TABLE_ROWS.get(name), "-")} '
                     f'| {int(trial.epochs)} | {100 * trial.gain:+.1f} | {group.seconds.mean():.0f} |')
    epochs = found.trials.epochs.sum() / args.epochs
    last = found.trials[(found.trials.name == 'alone') & (found.trials.rung == found.trials.rung.max())]
    found_alone = last.seconds.mean()
    teacher_use = ('not counted (a record from before the teacher was shared)' if 'teacher_computed' not in found.trials
                   else f'{int(found.trials.teacher_computed.sum())} batches computed, '
                   f'{int(found.trials.teacher_reused.sum())} shared between trials')
    alone_seconds = alone.seconds.mean() if len(alone) else float('nan')
    verdict = []
    if pick in gains:
        best = max(gains, key=gains.get)
        share = gains[pick] / gains[best] if gains[best] > 0 else float('nan')
        measured = sorted(gains) == sorted(found.candidates)
        verdict = [f'**kd_find picked `{pick}`**: mean test gain {gains[pick]:+.1f} points against {gains[best]:+.1f} '
                   f'for the best {"candidate" if measured else "candidate measured so far"} (`{best}`): {share:.0%} '
                   'of it (target: at least 80%).', '']
    return '\n'.join([
        '# kd_find on GTSRB 32x32', '',
        f'Command: `{command}` ({args.threads} torch thread(s); {torch.__version__}; '
        f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}).', '',
        f'Data: {"classes " + str(args.classes) if args.classes else "all 43 classes"}, the track split of '
        'bench/accuracy.py, every image decoded once (in memory). Teacher: the shared ResNet-34. Student: '
        f'`student_model` (width {args.width}), fit_one_cycle at lr {args.lr}, batch {args.bs}, {args.epochs} epochs, '
        'unfrozen. Test part, weighted F1; gains in points (100 x F1) over the student alone of the same seed, mean ± '
        'sample std over seeds. Beside them, the gain of the same method in bench/results/accuracy.md (other batches: '
        'images decoded every epoch) and kd_find\'s validation gain (accuracy) at the last rung it reached.', '',
        '| row | seeds | test F1 | gain (points) | accuracy.md gain | kd_find: last rung (epochs) '
        '| kd_find: valid gain there | seconds per run |', '|---|---|---|---|---|---|---|---|', *lines, '', *verdict,
        f'Cost of kd_find: {len(found.trials)} trials, {epochs:.1f} student runs of this schedule counted in epochs, '
        f'{found.seconds:.0f} s, i.e. {found.runs:.1f} runs of the student alone in seconds, side by side in its '
        f'process (its own last-rung trials of the student alone: {found_alone:.0f} s each), or '
        f'{found.seconds / alone_seconds:.1f} runs of the test runs\' student alone ({alone_seconds:.0f} s each). '
        f'Target: at most 8. Teacher forwards: {teacher_use}.', '',
        f'kd_find\'s verdict: {found.message}', '', *hint_pairs(found.candidates),
        '## Every trial of kd_find (validation split)', '',
        '| candidate | rung | epochs | seed | valid accuracy | agreement | seconds | teacher batches computed | '
        'shared |', '|---|---|---|---|---|---|---|---|---|',
        *[f'| {t.name} | {t.rung} | {t.epochs} | {t.seed} | {t.score:.4f} | {t.agreement:.4f} | {t.seconds:.0f} | '
          f'{count(getattr(t, "teacher_computed", None))} | {count(getattr(t, "teacher_reused", None))} |'
          for t in found.trials.itertuples()], '',
        '## Every test run', '', '| row | seed | test F1 | seconds |', '|---|---|---|---|',
        *[f'| {r.row} | {r.seed} | {r.test_f1:.4f} | {r.seconds:.0f} |' for r in runs.itertuples()], ''])


if __name__ == '__main__': main()
