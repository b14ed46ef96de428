"""The documentation against the code and the measurements: the API tables of docs/api.md name exactly what
`from fastkd.all import *` exports, with parameter names (and literal defaults) the functions really have, the Python
snippets of README.md and docs/*.md are valid Python, and each figure README.md quotes (and the key ones of docs/) is
found, with its seed or repeat count, in its file of bench/results/."""
import ast
import importlib
import inspect
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from scipy import stats

import fastkd.all

ROOT = Path(__file__).resolve().parents[1]
API = ROOT/'docs'/'api.md'
PAGES = [ROOT/'README.md', *sorted((ROOT/'docs').glob('*.md'))]
NAME = re.compile(r'[A-Za-z_]\w*')


def exported() -> set[str]:
    "What `from fastkd.all import *` gives: `fastkd.all.__all__`, else the `__all__` of each module it star-imports"
    if hasattr(fastkd.all, '__all__'): return set(fastkd.all.__all__)
    imports = [node for node in ast.parse(inspect.getsource(fastkd.all)).body if isinstance(node, ast.ImportFrom)]
    modules = [importlib.import_module(f'fastkd.{node.module}') for node in imports if node.names[0].name == '*']
    assert modules, 'fastkd.all imports no module with *'
    return {name for module in modules for name in module.__all__}


def api_entries() -> list[str]:
    "The backticked entries of the first column of docs/api.md's tables, e.g. `prepare_gtsrb(path, classes=None)`"
    rows = [line for line in API.read_text(encoding='utf-8').splitlines() if line.startswith('|')]
    rows = [row for row in rows if row.split('|')[1].strip() not in ('name', '---')]  # not the headers, their rules
    return [entry for row in rows for entry in re.findall(r'`([^`]+)`', row.split('|')[1])]


def arguments(entry: str) -> list[str]:
    "The arguments an entry lists between its parentheses, split at top-level commas"
    inside = entry[entry.index('(') + 1:entry.rindex(')')] if '(' in entry else ''
    parts, depth, start = [], 0, 0
    for i, char in enumerate(inside):
        depth += (char in '([{') - (char in ')]}')
        if char == ',' and depth == 0: parts, start = parts + [inside[start:i]], i + 1
    return [part.strip() for part in parts + [inside[start:]] if part.strip()]


def test_the_api_table_names_exactly_the_exports():
    names = [NAME.match(entry).group() for entry in api_entries()]
    twice = sorted({name for name in names if names.count(name) > 1})
    assert not twice, f'named twice in the API table: {twice}'
    missing, stale = exported() - set(names), set(names) - exported()
    assert not missing, f'exported by fastkd.all but not in the API table of docs/api.md: {sorted(missing)}'
    assert not stale, f'in the API table of docs/api.md but not exported by fastkd.all: {sorted(stale)}'


@pytest.mark.parametrize('entry', [e for e in api_entries() if '(' in e])
def test_the_api_table_gives_real_parameters(entry):
    """Each parameter the table shows exists under that name, a literal default is the real one, and every parameter
    without a default is shown (`...` elides the rest): `FitNet()` promises a call without arguments"""
    name = NAME.match(entry).group()
    params = inspect.signature(getattr(fastkd.all, name)).parameters
    shown = [argument.partition('=')[0].strip().lstrip('*') for argument in arguments(entry)]
    required = [key for key, p in params.items()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if '...' not in shown: assert set(required) <= set(shown), f'{entry} leaves out the required {required}'
    for argument in arguments(entry):
        if argument == '...': continue
        key, _, default = argument.partition('=')
        key = key.strip().lstrip('*')
        assert key in params, f'{name} has no parameter {key!r}: its parameters are {list(params)}'
        if default and default.strip() != '...':
            try: value = ast.literal_eval(default.strip())
            except ValueError: continue  # not a literal (e.g. an object): only the name is checked
            assert params[key].default == value, f'{name}({key}=...) defaults to {params[key].default!r}, not {value!r}'


@pytest.mark.parametrize('page', PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_python_snippets_are_valid_python(page):
    blocks = re.findall(r'^( *)```python\n(.*?)^\1```', page.read_text(encoding='utf-8'), flags=re.M | re.S)
    for indent, code in blocks:
        source = '\n'.join(line[len(indent):] for line in code.splitlines())
        try: ast.parse(source)
        except SyntaxError as error: pytest.fail(f'{page.name}: a Python snippet does not parse ({error}):\n{source}')


@pytest.mark.parametrize('page', ['README.md', 'docs/callback.md', 'docs/losses.md', 'docs/hints.md',
                                  'docs/scaling.md', 'docs/tasks.md', 'docs/gtsrb.md'])
def test_the_readme_and_each_subject_page_show_python(page):
    assert '```python' in (ROOT/page).read_text(encoding='utf-8'), f'{page} has no Python snippet'


RESULTS = ROOT/'bench'/'results'
FENCE = re.compile(r'^ *```.*?^ *```', flags=re.M | re.S)
# What a reader takes for a measurement: a ratio (0.95x), a share (29%), a mean ± std, points, a signed gain, a score
FIGURE = re.compile(r'(?<![\w.+-])(?:[+-]?\d+(?:\.\d+)?(?:x(?!\d)|%| ±| points)|[+-]\d+(?:\.\d+)?|\d+\.\d{3,})'
                    r'(?!\.?\d)')
# The numbers of a quote that must round from its results file: any with decimals, or with x, % or ± after them
ROUNDED = re.compile(r'(?<![\w.])[+-]?(?:\d+(?=x(?!\d)|%| ±)|\d+\.\d+(?!\.?\d))')  # not a version: 0.4.1
NUMBER = re.compile(r'(?<![\w.])[+-]?\d+(?:\.\d+)?')
COUNT = re.compile(r'\b(?:\d+|one|two|three|five) (?:seeds?|repeats?|kd_find run)\b')


def prose(page: Path) -> str:
    "A page's text outside code blocks, its whitespace collapsed (a quote may wrap across lines)"
    return ' '.join(FENCE.sub('', page.read_text(encoding='utf-8')).split())


def table_under(text: str, heading: str) -> list[list[str]]:
    "The rows (cells) of the first markdown table after `heading`, its header first, its rule left out"
    rows = []
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith('|'): rows.append([cell.strip() for cell in line.strip().strip('|').split('|')])
        elif rows: break
    return [row for row in rows if not set(''.join(row)) <= set('-: ')]


def seed_gains(text: str, heading: str, column: str) -> list[float]:
    "The per-seed gains of `column` in the table under `heading` (demo_verdict.md's layout: one row a seed)"
    header, *rows = table_under(text, heading)
    return [float(row[header.index(column)]) for row in rows]


@dataclass
class Gains:
    """A mean ± sample std over seeds, computed from the per-seed gains of a results file: the quote must say it as
    `+2.2 ± 1.5` and say how many seeds (with `ci`, also the 95% confidence interval of the mean)"""
    heading: str
    column: str
    ci: bool = False

    def __call__(self, text: str) -> list[str]:
        gains = seed_gains(text, self.heading, self.column)
        n, mean, std = len(gains), statistics.mean(gains), statistics.stdev(gains)
        said = [f'{mean:+.1f} ± {std:.1f}', f'{n} seeds']
        half = stats.t.ppf(0.975, n - 1) * std / n ** 0.5
        return said + [f'95% CI {mean - half:+.1f} to {mean + half:+.1f}'] if self.ci else said


@dataclass
class EverySeedGained:
    "Every per-seed gain of every column in the table under `heading` is above zero; the quote says how many seeds"
    heading: str

    def __call__(self, text: str) -> list[str]:
        header, *rows = table_under(text, self.heading)
        gains = [float(cell) for row in rows for cell in row[1:]]
        return [f'{len(rows)} seeds'] if min(gains) > 0 else [f'a seed lost ({min(gains)})']


@dataclass
class Quote:
    """Words of a page and what its results file holds for them. Each entry of `holds` is text found on one line of
    the file (a tuple: all of it on one line), or computed from the file (`Gains`): what it computes must be in the
    words. Every figure of the words rounds from a number of those lines. The seed or repeat count is in the words,
    or in `count`, a sentence of the same page that states it for several quotes. `results`: its file of
    bench/results/, or several, comma-separated."""
    page: str
    words: str
    results: str
    holds: tuple = ()
    count: str = ''
    ids: str = field(init=False)

    def __post_init__(self): self.ids = f'{self.page}:{self.results}:{self.words[:40]}'


R, LOSSES, BENCH = 'README.md', 'docs/losses.md', 'docs/benchmarks.md'
THREE = '3 seeds unless another count is given'  # README's "Which method to use" states it once for its bullets
HINT, HINT_CPU, HINT_GPU = '+ DIST + FitNet hint |', '| 4 | 3 |', '| 8 | 3 |'
NOW, BEFORE, REJECTED = '## Now:', '## Before:', '## Rejected:'
ONE, TWO, KEPT = '1 thread, channels-last teacher', '2 threads, channels-last teacher', '2 threads, teacher layout kept'
QUOTES = [
    Quote(R, 'distilling cost 75.4 points of test F1 on the digits (a 32 px teacher, 16 px students, 5 seeds)',
          'teacher_input.md', (('### digits: teacher trained at 32 px, students at 16 px',),
                               ("| distilled, teacher fed the student's size | 5 |", '-75.4 ± 5.5'))),
    Quote(R, 'and 2.2 on GTSRB (a 64 px teacher, 32 px students, 3 seeds)', 'teacher_input.md',
          (('### gtsrb: teacher trained at 64 px, students at 32 px',),
           ("| distilled, teacher fed the student's size | 3 |", '-2.2 ± 0.4'))),
    Quote(R, '+0.3 ± 0.8 and +0.7 ± 0.5 points, for a GTSRB student of 2.44% of the teacher\'s multiply-adds',
          'teacher_input.md', (("| distilled, TeacherInput (teacher's size) | 5 |", '+0.3 ± 0.8'),
                               ("| distilled, TeacherInput (teacher's size) | 3 |", '+0.7 ± 0.5'),
                               ('the student: 2.44% of its multiply-adds',)), '3 seeds'),
    Quote(R, 'closed 80% of the gap between the student distilled on the 10% alone and the one distilled on all the '
          'labels (+45.0 ± 7.6 points over 5 seeds)', 'unlabeled.md',
          (('the unlabeled 90% closed 45.0 of them, 80%',), ('| distilled, 10% labels + 90% unlabeled | 5 |', '+45.0 ± 7.6'))),
    Quote(R, 'the digits\' student scored 0.8923 against 0.8691 (5 seeds)', 'unlabeled.md',
          (('| distilled, 10% labels, as many steps | 5 |', '0.8923 ± 0.0222'),
           ('| distilled, 10% labels + 90% unlabeled | 5 |', '0.8691 ± 0.0254'))),
    Quote(R, 'On GTSRB at 4 epochs with DIST they closed 46% (+29.0 ± 2.6 points, 3 seeds)', 'unlabeled.md',
          (('### gtsrb:', '4 epochs'), ('closed 29.0 of them, 46%',), ('| distilled, 10% labels + 90% unlabeled | 3 |',
                                                                       '+29.0 ± 2.6'))),
    Quote(R, 'SoftTarget at T=1, tried there after DIST fell short, closed 57% (+34.7 ± 2.4 points over 3 seeds',
          'unlabeled-softtarget.md', (('SoftTarget T=1',), ('closed 34.7 of them, 57%',),
                                      ('| distilled, 10% labels + 90% unlabeled | 3 |', '+34.7 ± 2.4'))),
    Quote(R, "cost the student alone plus 55% of the live teacher's extra time (0.82x the live run's wall time, 5 "
          'seeds; the replay itself 1.7% of the student alone\'s time)', 'teacher_views.md',
          (("Views cost the student alone plus **55%** of the live teacher's extra time",),
           ('Wall time: (b)/(a) **0.82x**',), ('**+1.7% of the student alone**',), '--seeds 5')),
    Quote(R, 'it gained +6.7 ± 1.2 points at 4 epochs on a CPU', 'accuracy.md', ((HINT, HINT_CPU, '+6.7 ± 1.2'),),
          THREE),
    Quote(R, '+3.2 ± 0.5 at 8 epochs on a GPU', 'accuracy-gpu.md', ((HINT, HINT_GPU, '+3.2 ± 0.5'),), THREE),
    Quote(R, 'DIST alone gained +3.7 and +2.4', 'accuracy.md, accuracy-gpu.md',
          (('+ DIST |', HINT_CPU, '+3.7 ± 0.3'), ('+ DIST |', HINT_GPU, '+2.4 ± 1.3')), THREE),
    Quote(R, 'It gained +1.6 ± 0.2 points at 20 epochs, and its student scored above its teacher (0.9672 against '
          '0.9631 test F1)', 'accuracy-gpu.md',
          (('+ function matching, patient |', '| 20 | 3 |', '0.9672 ± 0.0025', '+1.6 ± 0.2'),
           ('| teacher (ResNet-34) |', '| 0.9631 |')), THREE),
    Quote(R, 'did nothing at 8 epochs (-0.2)', 'accuracy-gpu.md',
          (('+ function matching (MixUp + SoftTarget) |', HINT_GPU, '-0.2 ± 0.6'),), THREE),
    Quote(R, 'cost 6.0 points at 4', 'accuracy.md',
          (('+ function matching (MixUp + SoftTarget) |', HINT_CPU, '-6.0 ± 1.3'),), THREE),
    Quote(R, "+4.8 ± 2.7 points over 8 seeds (1 + 3 epochs, `make demo`'s 2 threads)", 'demo_verdict.md',
          (Gains(NOW, TWO), 'students 1 + 3 epochs, 8 seeds')),
    Quote(R, 'over 9 seeds gained +2.2 ± 1.5 points at 1 thread and +0.9 ± 1.9 at 2', 'demo_verdict.md',
          (Gains(BEFORE, ONE), Gains(BEFORE, TWO), 'students 1 + 6 epochs, 9 seeds')),
    Quote(R, 'At 1 + 6 epochs it was the best of the five methods (3 seeds)', 'kd_find.md',
          (('| softtarget |', '+2.1 ± 0.5'), ('1 + 6 epochs', 'seeds 42, 43, 44'))),
    Quote(R, 'plain SoftTarget cost 3.2 ± 1.4 points and DKD 9.2 ± 3.5', 'accuracy.md',
          (('+ SoftTarget |', HINT_CPU, '-3.2 ± 1.4'), ('+ DKD |', HINT_CPU, '-9.2 ± 3.5')), THREE),
    Quote(R, 'SoftTarget T4 (+2.1 ± 0.5 test points over 3 seeds), lost 7 of 179 validation images to the student '
          'alone at the first rung, on its one seed, and neither finalist showed a gain, for 12.4 student runs',
          'kd_find.md', (('| softtarget |', '+2.1 ± 0.5'), ('scored 7 of 179 validation images',),
                         ('| softtarget T4 | 0.8436 | 3 | 1 |', 'dropped at rung 1'),
                         ('No candidate showed a gain',), ('Cost of kd_find', '12.4 student runs'),
                         'seeds 42, 43, 44')),
    Quote(R, 'the best of its 7 candidates (+6.8 ± 0.5 test points over 3 seeds), with an interval of the mean '
          'validation gain of +1.1 to +9.6 points on the two seeds that did not choose it, for 10.0 student runs '
          'counted in epochs (one kd_find run); in seconds that is 13.8 runs of the student alone: the shared forwards '
          "took the teacher's share from 1.98 to 1.38 times", 'kd_find-gtsrb.md',
          (('| dist + hint (pick) | 3 |', '+6.8 ± 0.5'), 'the best of the 7 candidates',
           ('Cost of kd_find', '10.0 student runs', '13.8 runs of the student alone'),
           ('Under the rule as it landed', '+1.1 to +9.6'), ('from 1.98 to 1.38',))),
    Quote(R, 'those 6 trials alone took 7.7 runs of the student alone (920 s)', 'kd_find-gtsrb.md',
          (('took 920 s',), ('7.7 runs of the student alone',)), 'one kd_find run'),
    Quote(R, 'no false pick in 80 calls, and candidates that gain about 2 test points picked in 20/20 and 20/20 calls',
          'kd_find_null.md', (('All scenarios, max_seeds=8', '0/80'), ('**one pays**', '20/20 = 100%'),
                              ('**weak teacher**', '20/20 = 100%')), '20 calls per scenario'),
    Quote(R, 'DIST at the second look on 8 held-out seeds in every call, SoftTarget from a weak teacher (two '
          'candidates, so every seed judges) on 8 seeds in 16 calls and 3 in 4', 'kd_find_null.md',
          (('it took 8 held-out seeds in all 20 calls',),
           ('SoftTarget from the weak teacher 8 in 16 calls and 3 in 4',)),
          '20 calls per scenario'),
    Quote(R, 'stopped at 4 seeds: 30% and 45%', 'kd_find_null-rule2.md',
          (('All scenarios, max_seeds=4', '0/60'), ('**one pays**', '6/20 = 30%'), ('**weak teacher**', '9/20 = 45%')),
          '20 calls per scenario'),
    Quote(R, 'DIST + FitNet hint closed 29% of the teacher-student gap at 4 epochs', 'accuracy.md',
          ((HINT, HINT_CPU, '| 29% |'),), '(3 seeds a row)'),
    Quote(R, 'and 40% at 8 epochs on a GPU; patient function matching closed 134%', 'accuracy-gpu.md',
          ((HINT, HINT_GPU, '| 40% |'), ('+ function matching, patient |', '| 20 | 3 |', '| 134% |')),
          '(3 seeds a row)'),
    Quote(R, 'every one of the 8 seeds gaining', 'demo_verdict.md', (EverySeedGained(NOW),)),
    Quote(R, "a distilled epoch took 0.95x (0.79 to 0.99) the CPU time of a plain epoch plus the teacher's forwards "
          "and 0.94x (0.78 to 1.01) fasterai's, over 5 repeats", 'kd_overhead.md',
          (('fastkd / (plain + teacher)', '0.952 (0.79-0.99)'), ('fastkd / fasterai', '0.938 (0.78-1.01)'),
           '5 repeats')),
    Quote(R, "the epochs after the first cost 1.13x (0.99 to 1.32) the student alone's, over 3 repeats",
          'heavy_teacher.md', (('| fastkd cache=True |', '1.13x (0.99, 1.32, 1.13)'), '3 repeats')),
    Quote(R, 'five students (5 seeds) in new processes sharing a teacher store on disk cost 1.06x (wall; 1.10x CPU)',
          'teacher_once.md', (('5 students distilled with the store', '**1.06x**', '**1.10x**'), '5 seeds')),
    Quote(R, 'a TTA sweep took 0.45x the time of one `learn.tta` per setting, median of 5 repeats', 'tta_sweep.md',
          ('Median time ratio ours/notebook: 0.452 wall', '5 repeats of each sweep')),
    Quote(LOSSES, 'over 9 seeds at the same 1 + 6 epochs SoftTarget T=4 gained +2.2 ± 1.5 points at 1 thread and '
          '+0.9 ± 1.9 at 2', 'demo_verdict.md', (Gains(BEFORE, ONE), Gains(BEFORE, TWO))),
    Quote(LOSSES, "+4.8 ± 2.7 points over 8 seeds (2 threads, `make demo`'s setting), every seed gaining",
          'demo_verdict.md', (Gains(NOW, TWO), EverySeedGained(NOW))),
    Quote(LOSSES, 'SoftTarget T=4 +2.1 ± 0.5 points, function matching +1.2 ± 0.6, standardised SoftTarget +0.7 ± 0.6, '
          'DIST +0.1 ± 1.6, DKD -0.1 ± 0.8', 'kd_find.md',
          (('| softtarget |', '+2.1 ± 0.5'), ('| fm |', '+1.2 ± 0.6'), ('| softtarget-std |', '+0.7 ± 0.6'),
           ('| dist |', '+0.1 ± 1.6'), ('| dkd |', '-0.1 ± 0.8')), '1 + 6 epochs, 3 seeds'),
    Quote(LOSSES, 'the best of its 7 candidates (+6.8 ± 0.5 test points over 3 seeds), its interval of the mean '
          'validation gain above zero on held-out seeds, for 10.0 student runs counted in epochs and 13.8 runs of the '
          'student alone counted in seconds, in one kd_find run',
          'kd_find-gtsrb.md', (('| dist + hint (pick) | 3 |', '+6.8 ± 0.5'),
                               ('Cost of kd_find', '10.0 student runs', '13.8 runs of the student alone'))),
    Quote(BENCH, "fastkd / (plain epoch + teacher forwards) **0.95** (0.79 to 0.99), fastkd / fasterai 0.4.1's "
          'callback **0.94** (0.78 to 1.01)', 'kd_overhead.md',
          (('fastkd / (plain + teacher)', '0.952 (0.79-0.99)'), ('fastkd / fasterai', '0.938 (0.78-1.01)')),
          'their range over the 5 repeats'),
    Quote(BENCH, 'PyTorch loop / (plain + teacher) 0.92 (0.88 to 1.01). The ratios of the median times (0.85, 0.93 '
          'and 0.88)', 'kd_overhead.md',
          (('pytorch loop / (plain + teacher)', '0.882', '0.915 (0.88-1.01)'), ('fastkd / (plain + teacher)', '0.847'),
           ('fastkd / fasterai', '0.935')), 'their range over the 5 repeats'),
    Quote(BENCH, '+6.5 ± 3.0 points (95% CI +4.0 to +9.1)', 'demo_verdict.md', (Gains(NOW, ONE, ci=True),),
          'alone (8 seeds)'),
    Quote(BENCH, '+4.8 ± 2.7 points (95% CI +2.5 to +7.0)', 'demo_verdict.md', (Gains(NOW, TWO, ci=True),),
          'alone (8 seeds)'),
    Quote(BENCH, '+4.2 ± 3.4 points (95% CI +1.4 to +7.0)', 'demo_verdict.md', (Gains(NOW, KEPT, ci=True),),
          'alone (8 seeds)'),
    Quote(BENCH, '(+0.9 ± 1.9 points at 2 threads over 9 seeds)', 'demo_verdict.md', (Gains(BEFORE, TWO),)),
    Quote(BENCH, 'SoftTarget T4 (+2.1 ± 0.5 points over 3 seeds), was dropped at that rung, 7 of 179 validation '
          'images behind the student alone on its one seed', 'kd_find.md',
          (('| softtarget |', '+2.1 ± 0.5'), ('scored 7 of 179 validation images',))),
    Quote(BENCH, 'Cost of one kd_find run: 12.4 student runs counted in epochs, 15.5 in seconds', 'kd_find.md',
          (('Cost of kd_find', '12.4 student runs', '15.5 runs of the student alone'),)),
    Quote(BENCH, 'those 6 trials alone took 7.7 runs of the student alone (920 s)', 'kd_find-gtsrb.md',
          (('took 920 s',), ('7.7 runs of the student alone',)), 'one kd_find run'),
]


def rounds_from(figure: str, numbers: list[float]) -> bool:
    "`figure` (as a page writes it) is one of `numbers` rounded to its decimals, whatever the sign"
    places = len(figure.partition('.')[2])
    return any(abs(round(abs(n), places) - abs(float(figure))) < 1e-9 for n in numbers)


def check_quote(quote: Quote, page_text: str, results_text: str) -> list[str]:
    "What is wrong with `quote` against its page and its results file (nothing: an empty list)"
    if quote.words not in page_text: return [f'{quote.page} no longer says {quote.words!r}']
    problems, lines = [], []
    for hold in quote.holds:
        if callable(hold):
            computed = hold(results_text)
            lines += computed
            problems += [f'{quote.results} gives {said!r}, the quote does not' for said in computed
                         if said not in quote.words and said not in quote.count]
            continue
        parts = (hold,) if isinstance(hold, str) else hold
        found = [line for line in results_text.splitlines() if all(part in line for part in parts)]
        if not found: problems.append(f'{quote.results} has no line holding {parts}')
        lines += found
    numbers = [float(n) for n in NUMBER.findall(' '.join(lines))]
    problems += [f'{figure} is not in {quote.results} (rounded)' for figure in ROUNDED.findall(quote.words)
                 if not rounds_from(figure, numbers)]
    if not (COUNT.search(quote.words) or quote.count and quote.count in page_text):
        problems.append(f'{quote.page} does not say how many seeds or repeats made {quote.words!r}')
    return problems


@pytest.mark.parametrize('quote', QUOTES, ids=lambda quote: quote.ids)
def test_a_quoted_figure_is_in_its_results_file(quote):
    results = '\n'.join((RESULTS/name).read_text(encoding='utf-8') for name in quote.results.split(', '))
    problems = check_quote(quote, prose(ROOT/quote.page), results)
    assert not problems, '\n'.join(problems) + '\n(change the page, its results file and QUOTES together)'


def unquoted_figures(page: str, quotes: list[Quote]) -> list[str]:
    "The figures of `page` (prose) that no quote of `quotes` covers, each with a little of its context"
    text = prose(ROOT/page)
    spans = [(m.start(), m.end()) for q in quotes if q.page == page for m in re.finditer(re.escape(q.words), text)]
    return [text[max(0, m.start() - 30):m.end() + 10] for m in FIGURE.finditer(text)
            if not any(start <= m.start() < end for start, end in spans)]


def test_every_figure_of_the_readme_is_quoted():
    "A figure added to README.md without its results file in QUOTES fails here"
    loose = unquoted_figures(R, QUOTES)
    assert not loose, 'README.md quotes figures that QUOTES does not trace to bench/results/:\n' + '\n'.join(loose)


def test_a_wrong_figure_is_caught():
    "The checker itself: a figure off by one digit, a lost seed count, a gain the per-seed table does not give"
    results = ('## Now:\n\n| seed | a |\n| --- | --- |\n| 1 | 1.0 |\n| 2 | 3.0 |\n\n'
               '| ratio | x |\n|---|---|\n| r | 0.952 |')
    good = Quote('p', 'took 0.95x over 2 seeds, +2.0 ± 1.4', 'r', (('| r |', '0.952'), Gains(NOW, 'a')))
    assert check_quote(good, good.words, results) == []
    wrong = Quote('p', 'took 0.96x over 2 seeds, +2.0 ± 1.4', 'r', (('| r |', '0.952'), Gains(NOW, 'a')))
    assert check_quote(wrong, wrong.words, results) == ['0.96 is not in r (rounded)']
    uncounted = Quote('p', 'took 0.95x', 'r', (('| r |', '0.952'),))
    assert check_quote(uncounted, uncounted.words, results) == ["p does not say how many seeds or repeats made "
                                                                "'took 0.95x'"]
    off = Quote('p', '+2.1 ± 1.4 over 2 seeds', 'r', (Gains(NOW, 'a'),))
    assert check_quote(off, off.words, results) == ["r gives '+2.0 ± 1.4', the quote does not",
                                                    '+2.1 is not in r (rounded)']
    assert check_quote(good, 'another page', results) == [f'p no longer says {good.words!r}']


MEAN_STD = re.compile(r'(?<![\w.])[+-]?(\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)')
# Means ± std the pages give that no file of bench/results/ holds, each with where it does come from
ELSEWHERE = {
    'docs/benchmarks.md': {
        **{f: "the demo's report of each configuration (fastkd-report/report.md), which bench/results/ does not keep"
           for f in ('0.841 ± 0.030', '0.906 ± 0.024', '0.854 ± 0.046', '0.901 ± 0.026', '0.896 ± 0.025')},
        '2.8 ± 1.7': "what README quoted before the demo changed (history, not a measurement of today's demo)",
        **{f: 'the probes of ../shared/notes/kd-probes.md, which the sentence cites'
           for f in ('20.9 ± 8.3', '1.5 ± 2.3')}},
}


def untraced_means(page: Path) -> list[str]:
    "The `mean ± std` figures of `page` in no results file, no quote of QUOTES and not in ELSEWHERE"
    results = ' '.join(path.read_text(encoding='utf-8') for path in RESULTS.glob('*.md'))
    name, text = page.relative_to(ROOT).as_posix(), prose(page)
    spans = [(m.start(), m.end()) for q in QUOTES if q.page == name for m in re.finditer(re.escape(q.words), text)]
    found = [f'{m.group(1)} ± {m.group(2)}' for m in MEAN_STD.finditer(text)
             if not any(start <= m.start() < end for start, end in spans)]
    return [f for f in found if f not in results and f not in ELSEWHERE.get(name, {})]


@pytest.mark.parametrize('page', PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_mean_and_std_is_in_a_results_file(page):
    "A `mean ± std` of a page is found verbatim in bench/results/, or traced by QUOTES, or said to come from elsewhere"
    assert not untraced_means(page), f'{page.name}: in no file of bench/results/: {untraced_means(page)}'
