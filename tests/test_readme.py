"""The documentation against the code: the API tables of docs/api.md name exactly what `from fastkd.all import *`
exports, with parameter names (and literal defaults) the functions really have, and the Python snippets of README.md
and docs/*.md are valid Python."""
import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

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
