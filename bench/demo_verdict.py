"""How often does the demo's verdict flip under changes that only alter floating-point rounding?

Runs `fastkd demo` (its defaults, as `make demo` does) once per rounding configuration with `--seeds N`, then reads
every combination of some of those seeds as a demo of that many seeds would, by a verdict rule (`--demos 3:spread`:
3 seeds read by the rule the demo had until December 2026; `8:interval`: 8 seeds, the confidence-interval rule). A
demo *flips* when the configurations do not all give it the same verdict. Configurations: CPU threads (1 or 2) and the
teacher's memory layout during distillation (channels-last, fastkd's CPU default, or kept as it is). Each
configuration trains its own teacher and students from the same seeds, so every difference between them is rounding.

    python bench/demo_verdict.py --seeds 9                 # trains, then writes bench/results/demo_verdict.md
    python bench/demo_verdict.py --report --demos 3:spread 3:interval 8:interval  # rereads the runs only
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


RULES = {'spread': 'beyond_spread', 'interval': 'shown'}  # seed_gain's answer for each rule the demo has had


def verdicts(results: pd.DataFrame, window: int, rule: str) -> dict[str, bool]:
    "Whether each set of `window` seeds (every combination of the run's seeds) gains by `rule`"
    from fastkd.workflow import seed_gain
    alone, distilled = (results.loc[[name]].set_index('seed').test_f1 for name in ('student', 'distilled student'))
    return {' '.join(map(str, s)): seed_gain(alone.loc[list(s)], distilled.loc[list(s)])[RULES[rule]]
            for s in itertools.combinations(sorted(alone.index), window)}


def report(out: Path, demos: list[tuple[int, str]], dest: Path):
    runs = {json.loads((d/'bench.json').read_text())['config']: pd.read_csv(d/'results.csv', index_col='model')
            for d in sorted(out.iterdir()) if (d/'bench.json').exists()}
    if not runs: sys.exit(f'No finished run in {out}: run without --report first.')
    gains = pd.DataFrame({config: 100 * (r.loc['distilled student'].set_index('seed').test_f1
                                         - r.loc['student'].set_index('seed').test_f1) for config, r in runs.items()})
    lines = ["# Does the demo's verdict survive rounding? (`bench/demo_verdict.py`)", '',
             f'Command: `python bench/demo_verdict.py {" ".join(sys.argv[1:])}`; runs in `{out}`.', '',
             '## Per-seed gains (test F1 points, distilled minus alone, same seed)', '', _markdown(gains.round(2)), '',
             'Each demo below is a set of seeds of these runs (every combination), read by a rule as the demo reads '
             'its seeds; it *flips* when the configurations do not all give it the same verdict.', '']
    for window, rule in demos:
        table = pd.DataFrame({config: verdicts(r, window, rule) for config, r in runs.items()})
        flips = sum(len(set(row)) > 1 for row in table.itertuples(index=False))
        lines += [f'- {window} seeds, rule "{rule}": {flips} of {len(table)} demos flip ({flips / len(table):.0%}); '
                  f'a gain is claimed in {table.values.mean():.0%} of demo runs '
                  f'({", ".join(f"{c}: {table[c].mean():.0%}" for c in table.columns)}).']
    dest.write_text('\n'.join(lines + ['']))
    print('\n'.join(lines))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, default=9)
    parser.add_argument('--demos', nargs='+', default=['3:spread', '8:interval'],
                        help='demos to read the runs as, SEEDS:RULE (rules: spread, the old one; interval, the new)')
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
    if not args.one: report(args.out, [(int(n), rule) for n, rule in (d.split(':') for d in args.demos)], args.results)
