"""The package's house rules, checked on its source: lines of at most 120 characters, no private name imported from
another module, docs/architecture.md drawn from the code as it is, and fastai's `Learner` wrapped once however often
fastkd is imported."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_graph():
    "docs/module_graph.py, imported from its path (docs/ is not a package)"
    spec = importlib.util.spec_from_file_location('module_graph', ROOT/'docs'/'module_graph.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_line_of_the_package_is_longer_than_120_characters():
    long = [f'{path.relative_to(ROOT)}:{i}: {len(line)} characters'
            for path in sorted((ROOT/'fastkd').glob('*.py'))
            for i, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1) if len(line) > 120]
    assert not long, 'lines over 120 characters:\n' + '\n'.join(long)


def test_no_module_imports_a_private_name_of_another():
    graph = module_graph()
    assert graph.private_borrowings(graph.imports()) == []


def test_the_module_graph_in_the_docs_is_the_code_as_it_is():
    graph = module_graph()
    page = (ROOT/'docs'/'architecture.md').read_text(encoding='utf-8')
    drawn = page.split(graph.BEGIN)[1].split(graph.END)[0].strip()
    assert drawn == graph.markdown(graph.imports()), 'docs/architecture.md is stale: run python docs/module_graph.py --write'


RELOADED = """
import importlib
from fastai.learner import Learner
fastai_fit, fastai_export = Learner.fit, Learner.export
import fastkd.callback
for _ in range(2): importlib.reload(fastkd.callback)
for name, original in (('fit', fastai_fit), ('export', fastai_export)):
    method = getattr(Learner, name)
    assert method is not original, name + ' is not wrapped'
    assert method.__wrapped__ is original, name + ' wraps a wrapper, not fastai\\'s own'
    assert not hasattr(method.__wrapped__, '__wrapped__')
print('wrapped once')
"""


def test_importing_fastkd_again_wraps_fastai_fit_and_export_once():
    "In a fresh process: reloading `fastkd.callback` here would leave other tests with two callback classes"
    result = subprocess.run([sys.executable, '-c', RELOADED], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith('wrapped once')
