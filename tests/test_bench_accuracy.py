"bench/accuracy.py --quick on the real GTSRB 32x32 data and the shared teacher: the table, its choices, its files."
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fastai.learner import load_learner

from conftest import GTSRB_DATA, data_folder

SCRIPT = Path(__file__).resolve().parents[1]/'bench'/'accuracy.py'


def load_bench():
    "bench/accuracy.py as a module (bench/ is not a package)"
    spec = importlib.util.spec_from_file_location('accuracy_bench', SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def quick_run(gtsrb32, tmp_path_factory):
    "One quick run of function matching (its baseline comes along) with two candidate settings"
    if not (GTSRB_DATA/'teachers'/'resnet34-gtsrb32.pth').is_file(): pytest.skip('no shared teacher weights')
    tmp = tmp_path_factory.mktemp('accuracy')
    argv = ['--quick', '--rows', 'fm', '--candidates', '2', '--out', str(tmp/'out'),
            '--data', str(data_folder(gtsrb32, tmp/'data')), '--results', str(tmp/'accuracy.md')]
    table = load_bench().main(argv)
    return dict(table=table, runs=pd.read_csv(tmp/'out'/'runs.csv'), text=(tmp/'accuracy.md').read_text(),
                out=tmp/'out', argv=argv)


def test_a_row_brings_its_baseline_and_the_row_whose_setting_it_reuses():
    bench = load_bench()
    assert [row.key for row in bench.parse_args(['--rows', 'fm-patient']).rows] == \
        ['alone', 'fm', 'alone-patient', 'fm-patient']
    assert [row.key for row in bench.parse_args(['--rows', 'dist', 'dkd']).rows] == ['alone', 'dkd', 'dist']
    assert [row.key for row in bench.parse_args(['--rows', 'hint-patient', 'mixup-patient']).rows] == \
        ['alone', 'hint', 'alone-patient', 'hint-patient', 'mixup-patient']


def test_the_mixup_control_gets_a_gain_but_is_not_a_distillation_row_for_the_targets():
    "MixUp without a teacher is compared with the student alone, and never taken for the best distillation row"
    bench = load_bench()
    runs = pd.DataFrame([dict(row=row, setting=setting, seed=seed, epochs=20, valid_f1=valid, test_f1=valid + 0.01 * seed,
                              test_acc=0.9, test_f1_tta=0.9, test_acc_tta=0.9, n_aug=0, seconds=1.0)
                         for row, setting, valid in (('alone-patient', 'default', 0.90),
                                                     ('fm-patient', 'T4-weight0.5', 0.93),
                                                     ('mixup-patient', 'default', 0.95)) for seed in range(3)])
    table = bench.summary(runs, dict(test_f1=0.96)).set_index('key')
    assert table.at['mixup-patient', 'gain_mean'] == pytest.approx(5.0)  # 0.95 - 0.90, same seeds
    assert list(table.distilled) == [False, True, False]
    text = bench.targets(table.reset_index(), runs)
    assert text.startswith('Targets, on the distillation row with the best validation F1 (+ function matching, patient)')


def test_rows_are_run_from_every_seed(quick_run):
    runs = quick_run['runs']
    assert list(runs.row.unique()) == ['alone', 'fm'] and (runs.groupby('row').seed.apply(list) == [[0, 1]] * 2).all()
    assert runs.test_f1.between(0, 1).all() and runs.valid_f1.between(0, 1).all() and (runs.seconds > 0).all()


def test_setting_is_chosen_on_validation(quick_run):
    text, runs = quick_run['text'], quick_run['runs']
    selection = text[text.index('## Settings chosen'):text.index('## Every run')]
    fm_lines = [line.split(' | ') for line in selection.splitlines() if line.startswith('| fm |')]
    assert [line[1] for line in fm_lines] == ['T4-weight0.5', 'T4-weight1.0']  # both candidates, from the first seed
    valid = {line[1]: float(line[2]) for line in fm_lines}
    kept = next(line[1] for line in fm_lines if line[3].startswith('yes'))
    assert valid[kept] == max(valid.values()) and set(runs[runs.row == 'fm'].setting) == {kept}


def test_gain_and_gap_closed_come_from_paired_seeds(quick_run):
    table, runs = quick_run['table'].set_index('key'), quick_run['runs']
    alone, fm = (runs[runs.row == key].set_index('seed').test_f1 for key in ('alone', 'fm'))
    assert table.at['fm', 'gain_mean'] == pytest.approx(100 * (fm - alone).mean())
    assert table.at['fm', 'gain_std'] == pytest.approx(100 * (fm - alone).std())
    teacher_f1 = float(quick_run['text'].split('| teacher (ResNet-34) |')[1].split('|')[4])
    gap_closed = (fm.mean() - alone.mean()) / (teacher_f1 - alone.mean())
    assert table.at['fm', 'gap_closed'] == pytest.approx(gap_closed, abs=1e-3)  # the teacher's F1 is printed rounded


def test_every_student_is_exported_under_out_and_loads(quick_run):
    "Both candidates of the first seed and the kept setting's other seed, named after row, setting and seed"
    kept = quick_run['runs'][quick_run['runs'].row == 'fm'].setting.iloc[0]
    files = {p.name for p in (quick_run['out']/'students').glob('*.pkl')}
    assert files == {'alone-default-seed0.pkl', 'alone-default-seed1.pkl', 'fm-T4-weight0.5-seed0.pkl',
                     'fm-T4-weight1.0-seed0.pkl', f'fm-{kept}-seed1.pkl'}
    learn = load_learner(quick_run['out']/'students'/f'fm-{kept}-seed1.pkl')
    assert learn.model[1].out_features == 43


def test_results_say_how_they_were_made(quick_run):
    text = quick_run['text']
    assert f"`python bench/accuracy.py {' '.join(quick_run['argv'])}`" in text
    assert '- minutes: ' in text and ', CPU (1 command); load average where this report was written' in text and 'Targets, on the distillation row' in text
    assert 'Student: ' in text and 'faster at batch 1' in text
    results = text[text.index('## Results'):text.index('Rule for')]
    assert {line.count('|') for line in results.splitlines() if line.startswith('|')} == {13}  # 12 cells on every line


def test_resume_reuses_recorded_runs_and_adds_the_missing_rows(quick_run, tmp_path):
    "A second command adds a row to the table: the recorded runs are not trained again, and both rows are reported"
    out, argv = tmp_path/'out', quick_run['argv']
    shutil.copytree(quick_run['out'], out)
    before = {p.name: p.stat().st_mtime_ns for p in (out/'students').glob('*.pkl')}
    resume = ['--quick', '--rows', 'dist', '--candidates', '1', '--resume', '--out', str(out),
              '--data', argv[argv.index('--data') + 1], '--results', str(tmp_path/'accuracy.md')]
    table = load_bench().main(resume)
    assert list(table.key) == ['alone', 'dist', 'fm']  # the recorded rows and the new one, in the table's order
    after = {p.name: p.stat().st_mtime_ns for p in (out/'students').glob('*.pkl')}
    assert set(after) - set(before) == {'dist-T1-weight0.5-seed0.pkl', 'dist-T1-weight0.5-seed1.pkl'}
    assert all(after[name] == mtime for name, mtime in before.items())  # nothing recorded was trained again
    runs = pd.read_csv(out/'runs.csv')
    recorded = quick_run['runs'].set_index(['row', 'seed']).test_f1
    assert runs.set_index(['row', 'seed']).test_f1.loc[recorded.index].tolist() == recorded.tolist()
    text = (tmp_path/'accuracy.md').read_text()
    assert f"`python bench/accuracy.py {' '.join(argv)}`, then `python bench/accuracy.py {' '.join(resume)}`" in text
    with pytest.raises(SystemExit, match=r'made with other settings: lr 0.003 \(now 0.01\)'):
        load_bench().main([*resume, '--lr', '0.01'])
    with pytest.raises(SystemExit, match='already holds a table'):  # without --resume, recorded runs are kept safe
        load_bench().main([arg for arg in resume if arg != '--resume'])


def test_processes_side_by_side_build_one_table_in_memory(gtsrb32, tmp_path):
    """Two processes add a row each to one --in-memory table at the same time: both rows are recorded once, with
    their shared baseline, and --report writes the table from the records without training"""
    if not (GTSRB_DATA/'teachers'/'resnet34-gtsrb32.pth').is_file(): pytest.skip('no shared teacher weights')
    common = ['--quick', '--in-memory', '--candidates', '1', '--resume', '--out', str(tmp_path/'out'),
              '--data', str(data_folder(gtsrb32, tmp_path/'data')), '--results', str(tmp_path/'accuracy.md')]
    load_bench().main([*common, '--rows', 'alone'])
    env = {**os.environ, 'PYTHONPATH': str(SCRIPT.parents[1])}
    processes = [subprocess.Popen([sys.executable, str(SCRIPT), *common, '--rows', row], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for row in ('dist', 'softtarget')]
    for process in processes: assert process.wait(timeout=600) == 0, process.stdout.read()
    students = {p.name: p.stat().st_mtime_ns for p in (tmp_path/'out'/'students').glob('*.pkl')}
    table = load_bench().main([*common, '--report'])
    assert list(table.key) == ['alone', 'softtarget', 'dist'] and set(table.seeds) == {2}
    runs = pd.read_csv(tmp_path/'out'/'runs.csv')
    assert len(runs) == 6 and not runs.duplicated(['row', 'seed']).any()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path/'out'/'students').glob('*.pkl')} == students
    text = (tmp_path/'accuracy.md').read_text()
    assert text.count('--rows dist') == 1 and text.count('--rows softtarget') == 1 and '--report' in text
    assert ', CPU (4 commands); load average' in text and 'stopped before it ended' not in text


def test_processes_on_one_row_share_its_runs_out(gtsrb32, tmp_path):
    """Two processes given the same row at once: every run (the student alone and the distilled one, three seeds) is
    trained by one process only and recorded once, and each row's test scores use one TTA setting"""
    if not (GTSRB_DATA/'teachers'/'resnet34-gtsrb32.pth').is_file(): pytest.skip('no shared teacher weights')
    bench, data = load_bench(), data_folder(gtsrb32, tmp_path/'data')
    bench.prepared_data(data, bench.QUICK_CLASSES)  # once, before both start
    common = ['--quick', '--in-memory', '--candidates', '1', '--seeds', '0', '1', '2', '--resume', '--rows', 'dist',
              '--out', str(tmp_path/'out'), '--data', str(data), '--results', str(tmp_path/'accuracy.md')]
    env = {**os.environ, 'PYTHONPATH': str(SCRIPT.parents[1])}
    processes = [subprocess.Popen([sys.executable, str(SCRIPT), *common], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    trained = [line.split(':')[0] for output in outputs for line in output.splitlines() if ': valid F1 ' in line]
    assert sorted(trained) == sorted(f'{row} seed {seed}' for row in ('alone default', 'dist T1-weight0.5')
                                     for seed in range(3))  # each run once, by one of the two
    runs = pd.read_csv(tmp_path/'out'/'runs.csv')
    assert len(runs) == 6 and not runs.duplicated(['row', 'seed']).any()
    assert (runs.groupby('row').n_aug.nunique() == 1).all()


def test_relative_folders_are_taken_from_where_the_command_runs(gtsrb32, tmp_path, monkeypatch):
    "fastai exports relative to the data folder: a relative --out must still put every student under OUT/students"
    if not (GTSRB_DATA/'teachers'/'resnet34-gtsrb32.pth').is_file(): pytest.skip('no shared teacher weights')
    data_folder(gtsrb32, tmp_path/'data')
    monkeypatch.chdir(tmp_path)
    load_bench().main(['--quick', '--rows', 'alone', '--out', 'out', '--data', 'data', '--results', 'accuracy.md'])
    assert {p.name for p in (tmp_path/'out'/'students').glob('*.pkl')} == {'alone-default-seed0.pkl',
                                                                            'alone-default-seed1.pkl'}
    assert (tmp_path/'accuracy.md').is_file()


def test_a_report_of_an_empty_table_says_so(tmp_path):
    if not (GTSRB_DATA/'teachers'/'resnet34-gtsrb32.pth').is_file(): pytest.skip('no shared teacher weights')
    with pytest.raises(SystemExit, match='no run is recorded under .*: train rows there first'):
        load_bench().main(['--quick', '--report', '--out', str(tmp_path/'out')])
    assert not (tmp_path/'out').exists()  # nothing written
