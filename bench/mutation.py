"""Mutation testing of fastkd's core with mutmut 3: `make mutation` (slow, so not part of `make test` or CI).

Each module of `MODULES` is mutated on its own, in a scratch copy of `fastkd/` and `tests/` (mutmut works in a
`mutants/` folder beside its `setup.cfg`, and the repository keeps no such file), against a targeted selection of the
tests that exercise it: mutmut runs only the tests of that selection that call the mutated function, each mutant in a
process forked from one that has already imported torch and fastai. The tests' session fixtures (the digits, a trained
teacher) are built once in `<workdir>/fixtures` and reloaded by every mutant's run (`FASTKD_TEST_FIXTURES`, read by
tests/conftest.py). Survivors are shown with their diffs in `<workdir>/<module>/survivors.txt`; the counts go to
`bench/results/mutation.md` (the equivalent mutants are judged by hand there).

    python bench/mutation.py                        # every module of MODULES
    python bench/mutation.py losses tasks           # some of them
    python bench/mutation.py --max-children 2 --workdir /tmp/fastkd-mutation
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tests that check each module directly. test_distributed's two processes (torchrun) import the mutated copy and
# inherit mutmut's MUTANT_UNDER_TEST, so they check the DDP paths of hints, cache and callback too.
MODULES = {
    'losses': ['tests/test_losses.py'],
    'tasks': ['tests/test_tasks.py', 'tests/test_losses.py'],
    'hints': ['tests/test_hints.py', 'tests/test_distributed.py'],
    'cache': ['tests/test_cache.py', 'tests/test_teacher_store.py', 'tests/test_teacher_views.py',
              'tests/test_distributed.py'],
    'callback': ['tests/test_callback.py', 'tests/test_load_teacher.py', 'tests/test_mixed_precision.py',
                 'tests/test_hints.py', 'tests/test_distributed.py'],
}

SETUP_CFG = """[mutmut]
source_paths = fastkd
only_mutate = fastkd/{module}.py
pytest_add_cli_args = -p no:cacheprovider -p no:warnings
pytest_add_cli_args_test_selection =
{tests}
process_isolation = forkserver
do_not_mutate_patterns =
{docstrings}
"""
# Lines left unmutated: docstrings (a line opening a triple-quoted string, or holding only a double-quoted one; the
# code quotes its messages with single quotes). A changed docstring changes no behaviour, so every such mutant is
# equivalent, and each one costs a run of every test that calls its function.
DOCSTRINGS = ['^ *' + '"' * 3, '^ *"[^"]+"$']


def run_module(module: str, workdir: Path, max_children: int) -> dict:
    "Mutate `fastkd/<module>.py` in a fresh copy under `workdir`; the status of every mutant and the seconds taken"
    dest = workdir/module
    if dest.exists(): shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for folder in ('fastkd', 'tests'):
        shutil.copytree(ROOT/folder, dest/folder, ignore=shutil.ignore_patterns('__pycache__'))
    tests = '\n'.join(f'    {t}' for t in MODULES[module])
    (dest/'setup.cfg').write_text(SETUP_CFG.format(module=module, tests=tests,
                                                     docstrings='\n'.join(f'    {p}' for p in DOCSTRINGS)))
    mutmut = [sys.executable, '-m', 'mutmut']
    # the session fixtures (the digits folder, a trained teacher) built once, here, and reloaded by every mutant's run
    env = {**os.environ, 'FASTKD_TEST_FIXTURES': str(workdir/'fixtures')}
    (workdir/'fixtures').mkdir(exist_ok=True)
    start = time.perf_counter()
    with open(dest/'run.log', 'w') as log:
        subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--setup-only',
                        *MODULES[module]], cwd=dest, stdout=log, stderr=log, env=env)
        subprocess.run(mutmut + ['run', '--max-children', str(max_children)], cwd=dest, stdout=log, stderr=log,
                       env=env)
    seconds = time.perf_counter() - start
    listing = subprocess.run(mutmut + ['results', '--all', 'true'], cwd=dest, capture_output=True, text=True).stdout
    status = dict(re.findall(r'^\s*(\S+__mutmut_\d+): (.+?)\s*$', listing, flags=re.M))
    survivors = [name for name, s in status.items() if s in ('survived', 'no tests')]
    with open(dest/'survivors.txt', 'w') as out:
        for name in survivors:
            out.write(subprocess.run(mutmut + ['show', name], cwd=dest, capture_output=True, text=True).stdout + '\n')
    return dict(status=status, seconds=seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('modules', nargs='*', default=list(MODULES), help=f'some of {", ".join(MODULES)}')
    parser.add_argument('--workdir', type=Path, default=Path('/tmp/fastkd-mutation'))
    parser.add_argument('--max-children', type=int, default=2)
    args = parser.parse_args()
    unknown = set(args.modules) - set(MODULES)
    if unknown: parser.error(f'unknown modules {", ".join(sorted(unknown))}: choose from {", ".join(MODULES)}')
    for module in args.modules:
        result = run_module(module, args.workdir, args.max_children)
        counts = Counter(result['status'].values())
        print(f'{module}: {len(result["status"])} mutants in {result["seconds"]:.0f} s: {dict(counts)}; survivors '
              f'in {args.workdir/module/"survivors.txt"}', flush=True)


if __name__ == '__main__':
    main()
