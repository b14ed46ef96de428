"""The tutorials of nbs/ are committed executed at their default settings (outputs kept, cleaned as nbdev cleans),
and run end to end here with nbclient at tiny sizes.

Each run replaces the notebook's `parameters` cell with tiny values, executes it in memory (the committed file is
never written) in a temporary working directory on a kernel that runs this interpreter, and appends one cell that
prints, as JSON, the objects the test checks. The helpers are those of nbs/run_notebooks.py, which writes the
committed outputs."""
import ast
import copy
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from fastai.vision.models import resnet18, resnet34
from fastai.vision.learner import create_vision_model
from nbclient.exceptions import CellExecutionError
from PIL import Image

NBS = Path(__file__).resolve().parents[1]/'nbs'
NOTEBOOKS = ['00_quickstart.ipynb', '01_gtsrb_distillation.ipynb', '02_distillation_methods.ipynb',
             '03_compression.ipynb', '04_choosing_a_method.ipynb']
GTSRB_TINY = dict(download=False, classes=[0, 19], classes_of_interest=[0], size=16, bs=64, teacher_epochs=1,
                  frozen_epochs=1, unfrozen_epochs=1, lr_find_iters=5, n_augs=[0, 2])


def _load_runner():
    "nbs/run_notebooks.py as a module"
    spec = importlib.util.spec_from_file_location('run_notebooks', NBS/'run_notebooks.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


@pytest.fixture(scope='module')
def kernel_dirs(tmp_path_factory) -> list[str]:
    "A kernelspec that runs this interpreter (the venv's python) with one thread, as the rest of the suite runs"
    return runner.kernel_dirs(tmp_path_factory.mktemp('jupyter'), {'OMP_NUM_THREADS': '1'})


@pytest.fixture(scope='module')
def small_digits(digits_path, tmp_path_factory) -> Path:
    "The first 40 training, 15 validation and 15 test images of each digit, marked complete for `write_digits`"
    dest = tmp_path_factory.mktemp('small_digits')
    for split, n in {'train': 40, 'valid': 15, 'test': 15}.items():
        for folder in sorted((digits_path/split).iterdir()):
            (dest/split/folder.name).mkdir(parents=True)
            for image in sorted(folder.glob('*.png'))[:n]: shutil.copy(image, dest/split/folder.name)
    (dest/'.complete').touch()
    return dest


def parameters_cell(nb) -> nbformat.NotebookNode:
    "The one code cell tagged `parameters`"
    cells = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
    assert len(cells) == 1 and cells[0].cell_type == 'code', 'a notebook needs exactly one code cell tagged parameters'
    return cells[0]


def assigned_names(source: str) -> set[str]:
    "The names a cell assigns"
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for target in node.targets}


def run_notebook(name: str, kernel_dirs: list[str], cwd: Path, report: str, **parameters) -> tuple[dict, dict]:
    """Execute notebook `name` in `cwd` with its parameters cell replaced by `parameters`: the JSON value of the
    expression `report` evaluated at the end, and the executed notebook. The committed file is left as it was."""
    committed = (NBS/name).read_bytes()
    nb = nbformat.read(NBS/name, as_version=4)
    cell = parameters_cell(nb)
    assert set(parameters) == assigned_names(cell.source), f'the tiny parameters of {name} are out of date'
    cell.source = '\n'.join(f'{k} = {v!r}' for k, v in parameters.items())
    nb.cells.append(nbformat.v4.new_code_cell(f"import json, sys\nprint(json.dumps({{'python': sys.executable, "
                                              f"**({report})}}, default=float))"))
    try: runner.execute(nb, cwd, kernel_dirs, timeout=600)
    finally: assert (NBS/name).read_bytes() == committed, f'running {name} changed the committed notebook'
    result = json.loads(''.join(o.text for o in nb.cells[-1].outputs if o.get('name') == 'stdout'))
    assert result.pop('python') == sys.executable, 'the kernel ran another interpreter than the tests'
    return result, nb


def frame(d: dict) -> pd.DataFrame:
    "A DataFrame from `to_dict(orient='index')`"
    return pd.DataFrame.from_dict(d, orient='index')


def test_notebooks_are_committed_executed_and_clean():
    """The tutorials, each with a title cell saying how long it ran, one parameters cell, outputs from a run without
    errors, and nothing that changes from run to run (execution counts, volatile metadata)"""
    assert sorted(p.name for p in NBS.glob('*.ipynb')) == NOTEBOOKS, 'every notebook needs a test in this file'
    for name in NOTEBOOKS:
        nb = nbformat.read(NBS/name, as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].cell_type == 'markdown' and nb.cells[0].source.startswith('# '), f'{name}: no title cell'
        assert '*Run time:* ' in nb.cells[0].source and 'TIMING' not in nb.cells[0].source, f'{name}: no run time'
        assert assigned_names(parameters_cell(nb).source), f'{name}: the parameters cell sets no sizes'
        outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
        assert outputs, f'{name} is committed without outputs: run `python nbs/run_notebooks.py {name}`'
        assert not [o for o in outputs if o.output_type == 'error'], f'{name} is committed with an error'
        assert nb == runner.clean(copy.deepcopy(nb)), (f'{name} holds execution counts or volatile metadata: run '
                                                       f'`python nbs/run_notebooks.py {name}`, which cleans it')


def test_quickstart(kernel_dirs, small_digits, tmp_path):
    """A teacher, the student alone and the same student distilled: all learn; the teacher reloads from both kinds
    of weights file; the exported student has no fastkd callback"""
    report = ("{'summary': summary.to_dict(orient='index'), 'lr': lr, "
              "'columns': list(distilled.recorder.metric_names), 'alone_columns': list(alone.recorder.metric_names), "
              "'exported': [type(cb).__name__ for cb in load_learner(distilled.path/'student.pkl').cbs], "
              "'same_weights': [all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), "
              "teacher.model.state_dict().values())) for m in (from_file, from_learn_save)]}")
    result, nb = run_notebook('00_quickstart.ipynb', kernel_dirs, tmp_path, report, data_path=str(small_digits),
                              size=16, bs=32, epochs=3)
    summary = frame(result['summary'])
    assert list(summary.index) == ['teacher', 'student alone', 'distilled student']
    assert summary.loc['student alone', 'parameters'] == summary.loc['distilled student', 'parameters']
    assert summary.loc['distilled student', 'parameters'] < summary.loc['teacher', 'parameters'] / 5
    assert (summary['valid accuracy'] > 0.2).all()  # 400 images, 3 epochs at 16 px: well above chance (0.1)
    assert result['lr'] > 0
    assert {'train_ce', 'train_kd'} <= set(result['columns'])  # the distilled student trained with the callback
    assert 'train_kd' not in result['alone_columns']
    assert result['same_weights'] == [True, True]  # torch.save(state_dict) and learn.save files
    assert 'KnowledgeDistillation' not in result['exported']
    shown = [c for c in nb.cells if 'show_results(' in c.source or 'plot_confusion_matrix(' in c.source]
    assert len(shown) == 2 and all(any('image/png' in o.get('data', {}) for o in c.outputs) for c in shown)


def test_gtsrb_distillation(kernel_dirs, gtsrb_data, tmp_path):
    "The reference workflow on two real GTSRB classes: folders, teacher, distilled student, TTA sweep, plot"
    report = ("{'sweep': sweep.to_dict(orient='list'), 'comparison': comparison.to_dict(orient='index'), "
              "'vocab': list(dls.vocab), 'test_labels': sorted(set(y_true.tolist())), 'n_masked': int(mask.sum()), "
              "'columns': list(student.recorder.metric_names)}")
    work = tmp_path/'gtsrb'
    teacher = gtsrb_data/'teachers'/'resnet34-gtsrb32.pth'  # the shared ResNet-34 (README.md there)
    result, nb = run_notebook('01_gtsrb_distillation.ipynb', kernel_dirs, tmp_path, report, gtsrb_data=str(gtsrb_data),
                              teacher_weights=str(teacher) if teacher.is_file() else None, work_path=str(work),
                              **GTSRB_TINY)
    assert sorted(p.name for p in (work/'train').iterdir()) == ['0', '19']  # only the classes asked for
    assert result['vocab'] == list(range(43)) and result['test_labels'] == [0, 19]
    assert 0 < result['n_masked'] < len(list((work/'test').glob('*.ppm')))  # class 19 is not of interest
    assert {'train_ce', 'train_kd'} <= set(result['columns'])
    sweep = pd.DataFrame(result['sweep'])
    assert sweep.n_aug.tolist() == [0, 2]
    assert sweep.score.between(0, 1).all() and (sweep.time > 0).all()
    comparison = frame(result['comparison'])
    assert list(comparison.index) == ['teacher', 'student']
    assert comparison.loc['student', 'parameters'] < comparison.loc['teacher', 'parameters']
    assert sweep.score[0] == pytest.approx(comparison.loc['student', 'weighted F1'])  # n_aug=0: plain predictions
    with Image.open(tmp_path/'tta_sweep.png') as png: assert png.format == 'PNG' and png.width > 100
    plot_cell = next(c for c in nb.cells if 'plot_tta(' in c.source)
    assert any('image/png' in o.get('data', {}) for o in plot_cell.outputs), 'the TTA plot is not shown as an image'


def test_gtsrb_notebook_says_when_data_is_absent(kernel_dirs, tmp_path):
    "Without the archive, the cell after the parameters stops with an error that says what is missing and the way out"
    with pytest.raises(CellExecutionError) as error:
        run_notebook('01_gtsrb_distillation.ipynb', kernel_dirs, tmp_path, '{}', gtsrb_data=str(tmp_path/'nowhere'),
                     teacher_weights=None, work_path=None, **GTSRB_TINY)
    assert error.value.ename == 'FileNotFoundError'
    assert 'GTSRB data not found' in error.value.evalue and 'download = True' in error.value.evalue
    assert 'FASTKD_GTSRB' in error.value.evalue


def test_distillation_methods(kernel_dirs, small_digits, tmp_path):
    "One row per model, a conclusion that says what the table says, and a multi-label student on BinarySoftTarget"
    report = ("{'results': results.to_dict(orient='index'), "
              "'gains': {m: gains_over_student(results, m).to_dict() for m in ['accuracy', 'weighted_f1']}, "
              "'multi_kd': repr(multi_kd), 'multi_columns': list(multi_student.recorder.metric_names), "
              "'multi_scores': multi_scores.to_dict(orient='index')}")
    result, nb = run_notebook('02_distillation_methods.ipynb', kernel_dirs, tmp_path, report,
                              data_path=str(small_digits), size=16, bs=32, epochs=1, seeds=[0],
                              teacher_filters=[3, 16, 32, 10], student_filters=[3, 8, 10])
    results = frame(result['results'])
    assert list(results.index) == ['teacher', 'student alone', 'CE + SoftTarget', 'CE + DKD', 'CE + DIST',
                                   'CE + LogitMSE', 'CE + SoftTarget, standardised logits',
                                   'CE + SoftTarget, weight SchedLin(0, 0.5)',
                                   'CE + SoftTarget, ensemble of 2 teachers', 'CE + SoftTarget + FitNet hint',
                                   'CE + SoftTarget + cosine hint', 'CE + SoftTarget + attention transfer']
    assert results[['accuracy', 'weighted_f1']].stack().between(0, 1).all() and (results.runs == 1).all()
    assert results.accuracy.nunique() > 1  # the losses train different students
    conclusion = ''.join(o.text for o in next(c for c in nb.cells if 'gains_over_student(results' in c.source).outputs)
    for metric, gains in result['gains'].items():  # the conclusion is read from the table
        alone = results.loc['student alone', metric]
        distilled = results[metric].drop(['teacher', 'student alone'])
        assert gains == pytest.approx((distilled[distilled > alone] - alone).to_dict())
        assert f'{metric}: the student alone scores {alone:.4f}' in conclusion
        assert f'{len(gains)} of {len(distilled)} distillation losses beat it' in conclusion
    assert 'BinarySoftTarget' in result['multi_kd']  # picked from the learner's BCE loss
    assert {'train_bce', 'train_kd'} <= set(result['multi_columns']) and 'train_ce' not in result['multi_columns']
    assert frame(result['multi_scores']).accuracy_multi.between(0, 1).all()


def test_compression(kernel_dirs, tmp_path):
    "The comparison of the GTSRB pair counts the parameters of real ResNet-34 and ResNet-18 models"
    report = "{'report': report.to_dict(orient='index'), 'summary': compression_summary(report)}"
    result, _ = run_notebook('03_compression.ipynb', kernel_dirs, tmp_path, report, size=32, n_classes=43,
                             batch_size=4, n_repeats=2)
    report = frame(result['report'])
    assert list(report.index) == ['parameters', 'size_mb', 'latency_ms', 'throughput_per_s']
    count = lambda arch: sum(p.numel() for p in create_vision_model(arch, 43, pretrained=False).parameters())
    assert report.loc['parameters', 'teacher'] == count(resnet34)
    assert report.loc['parameters', 'student'] == count(resnet18)
    assert report.loc['parameters', 'student/teacher'] == pytest.approx(count(resnet18) / count(resnet34))
    assert (report[['teacher', 'student']] > 0).all().all()
    assert result['summary'].startswith("The student has ")


def test_choosing_a_method(kernel_dirs, small_digits, tmp_path):
    """kd_find from a notebook: every candidate in the table with the seeds and stage it rests on, two finalists
    judged on the held-out seeds, a verdict, the plot drawn, and the student trained with the choice"""
    report = ("{'table': res.table[['seeds', 'epochs', 'stage']].to_dict(orient='index'), 'best': res.best, "
              "'top': res.top, 'message': res.message, 'candidates': list(res.candidates), "
              "'held_out': sorted(set(res.trials[res.trials.rung == 1].seed)), "
              "'test': {name: learn.validate(dl=test_dl)[1] for name, learn in learners.items()}, "
              "'trained_with': [type(cb).__name__ for cb in learners[f'distilled: {choice}'].cbs]}")
    result, nb = run_notebook('04_choosing_a_method.ipynb', kernel_dirs, tmp_path, report,
                              data_path=str(small_digits), size=16, bs=32, teacher_epochs=2, epochs=2, seeds=[0, 1, 2],
                              max_seeds=3)
    table = frame(result['table'])
    assert set(table.index) == {'alone', *result['candidates']} and len(result['candidates']) >= 6
    final = table[(table.stage == 'final') & (table.index != 'alone')]
    dropped = table[table.stage != 'final']
    assert len(final) == 2 and (final.epochs == 2).all() and (final.seeds >= 2).all()
    assert len(dropped) == len(result['candidates']) - 2 and (dropped.seeds == 1).all() and (dropped.epochs == 1).all()
    assert result['held_out'][:2] == [1, 2] and 0 not in result['held_out']  # seed 0 chose, the others judged
    assert result['best'] is None or result['best'] in final.index
    assert result['top'] in final.index
    assert result['message'].startswith(('Distil with', 'No candidate', 'No verdict'))
    assert all(0 < score <= 1 for score in result['test'].values())
    assert 'KnowledgeDistillation' in result['trained_with']
    kd_cell = next(c for c in nb.cells if c.cell_type == 'code' and '.kd_find(' in c.source)
    assert any('image/png' in o.get('data', {}) for o in kd_cell.outputs), 'kd_find drew no plot'
