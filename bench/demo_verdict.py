"""How often does the demo's verdict flip under changes that only alter floating-point rounding?

Runs `fastkd demo` (its defaults, as `make demo` does) once per rounding configuration with `--seeds N`, then reads
every window of `--window` consecutive seeds as a demo of that many seeds would: its verdict by the demo's rule. A
window's verdict *flips* when it differs between configurations. Configurations: CPU threads (1 or 2) and the
teacher's memory layout during distillation (channels-last, fastkd's CPU default, or kept as it is). Each
configuration trains its own teacher and students from the same seeds, so every difference between them is rounding.

    python bench/demo_verdict.py --seeds 9 --window 3      # trains, then writes bench/results/demo_verdict.md
    python bench/demo_verdict.py --report --window 3 5     # rereads the runs, trains nothing
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {'2 threads, channels-last teacher': dict(threads=2, channels_last=True),
           '1 thread, channels-last teacher': dict(threads=1, channels_last=True),
           '2 threads, teacher layout kept': dict(threads=2, channels_last=False)}


def _slug(name: str) -> str: return name.replace(', ', '_').replace(' ', '-')


def _markdown(table: pd.DataFrame) -> str:
    "`table` as a Markdown table (pandas' own needs tabulate, which fastkd does not install)"
    rows = [[str(i), *map(str, row)] for i, row in zip(table.index, table.itertuples(index=False))]
    header = [table.index.name or '', *map(str, table.columns)]
    return '\n'.join('| ' + ' | '.join(r) + ' |' for r in [header, ['---'] * len(header), *rows])


def train(config: str, seeds: int, out: Path, extra: list[str]):
    "One `fastkd demo` run in this process, with the teacher's channels-last layout switched off when asked"
    import fastkd.callback
    from fastkd.cli import main
    settings = CONFIGS[config]
    if not settings['channels_last']: fastkd.callback._to_channels_last = lambda model: []  # layout kept: rounding only
    start = time.perf_counter()
    main(['demo', '--seeds', str(seeds), '--threads', str(settings['threads']), '--out', str(out), *extra])
    (out/'bench.json').write_text(json.dumps(dict(config=config, seconds=time.perf_counter() - start, extra=extra)))


def verdicts(results: pd.DataFrame, window: int) -> dict[str, bool]:
    "Whether each window of `window` consecutive seeds gains beyond the spread, by the demo's own rule"
    from fastkd.workflow import seed_gain
    seeds = sorted(results.loc['student'].seed)
    alone, distilled = (results.loc[[name]].set_index('seed').test_f1 for name in ('student', 'distilled student'))
    return {f'{s[0]}-{s[-1]}': seed_gain(alone.loc[s], distilled.loc[s])['beyond_spread']
            for s in (seeds[i:i + window] for i in range(len(seeds) - window + 1))}


def report(out: Path, windows: list[int], dest: Path):
    runs = {json.loads((d/'bench.json').read_text())['config']: pd.read_csv(d/'results.csv', index_col='model')
            for d in sorted(out.iterdir()) if (d/'bench.json').exists()}
    if not runs: sys.exit(f'No finished run in {out}: run without --report first.')
    lines = ['# Does the demo\'s verdict survive rounding? (`bench/demo_verdict.py`)', '',
             f'Command: `python bench/demo_verdict.py {" ".join(sys.argv[1:])}`; runs in `{out.relative_to(ROOT)}`.', '',
             '## Per-seed gains (test F1 points, distilled minus alone, same seed)', '']
    gains = pd.DataFrame({config: 100 * (r.loc['distilled student'].set_index('seed').test_f1
                                         - r.loc['student'].set_index('seed').test_f1) for config, r in runs.items()})
    lines += [_markdown(gains.round(2)), '']
    for window in windows:
        table = pd.DataFrame({config: verdicts(r, window) for config, r in runs.items()})
        flips = [len(set(row)) > 1 for row in table.itertuples(index=False)]
        pairs = [(a, b) for a, b in itertools.combinations(table.columns, 2)]
        differ = sum((table[a] != table[b]).sum() for a, b in pairs)
        lines += [f'## Windows of {window} seeds: gain beyond the spread?', '', _markdown(table), '',
                  f'Windows whose verdict differs between configurations: {sum(flips)} of {len(flips)}; '
                  f'pairs of configurations that disagree on a window: {differ} of {len(pairs) * len(table)}.', '']
    dest.write_text('\n'.join(lines))
    print('\n'.join(lines))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, default=9)
    parser.add_argument('--window', type=int, nargs='+', default=[3])
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument('--out', type=Path, default=ROOT/'bench'/'out'/'demo_verdict')
    parser.add_argument('--results', type=Path, default=ROOT/'bench'/'results'/'demo_verdict.md')
    parser.add_argument('--report', action='store_true', help='only reread finished runs')
    parser.add_argument('--one', help='(internal) train this configuration in this process')
    args, extra = parser.parse_known_args()
    if args.one: train(args.one, args.seeds, args.out/_slug(args.one), extra)
    elif not args.report:
        import subprocess
        for config in args.configs:  # a process each: thread count and the layout switch stay with their run
            if (args.out/_slug(config)/'bench.json').exists(): continue
            subprocess.run([sys.executable, __file__, '--one', config, '--seeds', str(args.seeds), '--out',
                            str(args.out), *extra], check=True)
    if not args.one: report(args.out, args.window, args.results)
