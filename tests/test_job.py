"""The main job never misleads: a teacher checked before anything trains, a report that says what made it, and a job
killed at any moment that resumes where it stopped and reports what an uninterrupted one does."""
import json
import shutil
import signal
import subprocess
import time

import pandas as pd
import pytest
import torch

from conftest import GTSRB_DATA, data_folder
from fastkd.cli import main
from fastkd.runs import RunStore
from test_cli import FASTKD, TINY

TEACHER_32PX = GTSRB_DATA/'teachers'/'resnet34-gtsrb32.pth'
JOB = ['demo', *TINY, '--seeds', '2', '--freeze-epochs', '0', '--teacher-epochs', '2', '--threads', '1']
SCORES = ['seed', 'parameters', 'valid_accuracy', 'test_f1', 'test_f1_tta1', 'epochs']


@pytest.fixture(scope='module')
def gtsrb_three_classes(gtsrb32, tmp_path_factory):
    "GTSRB 32x32 prepared for three classes (the smallest ones)"
    data = data_folder(gtsrb32, tmp_path_factory.mktemp('three')/'data')
    assert main(['prepare', '--data', str(data), '--classes', '0', '19', '37']) == 0
    return data


def test_a_32px_teacher_receives_32px_images_from_a_job_at_another_size(gtsrb_three_classes, tmp_path, capsys):
    "The check finds the size the teacher works at; the teacher gets it, the students train at --size, both say so"
    if not TEACHER_32PX.exists(): pytest.skip(f'no shared teacher at {TEACHER_32PX}')
    out = tmp_path/'report'
    assert main(['gtsrb', '--data', str(gtsrb_three_classes), '--classes', '0', '19', '37', *TINY, '--teacher-weights',
                 str(TEACHER_32PX), '--teacher', 'resnet34', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f'The teacher (resnet34 from {TEACHER_32PX}) works at 32 px: it receives the students\' images resized to '
            '32 px, and the students train at --size 16.') in printed
    results = pd.read_csv(out/'results.csv', index_col='model')
    assert results.loc['teacher', 'test_f1'] > 0.9  # scored on the images it takes
    assert (results['size'] == 16).all()
    assert ("- The teacher received the students' images as it takes them, TeacherInput(size=(32, 32)): the students "
            'trained at 16 px.') in (out/'report.md').read_text()


def test_a_teacher_size_at_which_the_teacher_fails_stops_the_job(gtsrb_three_classes, tmp_path):
    if not TEACHER_32PX.exists(): pytest.skip(f'no shared teacher at {TEACHER_32PX}')
    with pytest.raises(SystemExit, match=r'^fastkd: The teacher \(resnet34 from .*\) at 96 px scores .*no better than '
                                         r'chance.*Nothing was trained or written\.$'):
        main(['gtsrb', '--data', str(gtsrb_three_classes), '--classes', '0', '19', '37', *TINY, '--teacher-weights',
              str(TEACHER_32PX), '--teacher', 'resnet34', '--teacher-size', '96', '--out', str(tmp_path/'report')])
    assert not (tmp_path/'report').exists()


def test_evaluate_without_a_size_scores_the_model_at_the_size_it_works_at(gtsrb_three_classes, tmp_path, capsys):
    if not TEACHER_32PX.exists(): pytest.skip(f'no shared teacher at {TEACHER_32PX}')
    common = ['evaluate', '--data', str(gtsrb_three_classes), '--weights', str(TEACHER_32PX), '--arch', 'resnet34',
              '--classes', '0', '19', '37', '--n-augs', '0']
    assert main([*common, '--out', str(tmp_path/'found')]) == 0
    printed = capsys.readouterr().out
    assert f'The model in {TEACHER_32PX} works at 32 px, not at --size 96: it is scored at 32 px.' in printed
    assert main([*common, '--size', '32', '--out', str(tmp_path/'right')]) == 0
    printed = capsys.readouterr().out
    score = pd.read_csv(tmp_path/'right'/'tta.csv').score[0]
    assert score > 0.5 and f'{score:.4f}' in printed and '32 px' in printed
    assert pd.read_csv(tmp_path/'found'/'tta.csv').score[0] == pytest.approx(score)


def test_weights_the_job_writes_say_what_they_were_trained_for(tmp_path, few_digits):
    out = tmp_path/'report'
    assert main([*JOB, '--seeds', '1', '--data', str(few_digits), '--out', str(out)]) == 0
    assert json.loads((out/'student.json').read_text()) == {'arch': 'xresnet18-quarter', 'size': 16}
    report = (out/'report.md').read_text()
    header = report.split('**')[0]  # what comes before the verdict
    command = f'fastkd demo {" ".join(TINY)} --seeds 2 --freeze-epochs 0 --teacher-epochs 2 --threads 1 --seeds 1'
    assert f'Made by `{command} --data {few_digits} --out {out}` with fastkd ' in header
    assert all(f'{name} ' in header for name in ('fastai', 'torch', 'python'))
    assert '1 torch threads' in header and 'GPU: none' in header
    for setting, value in (('size', 16), ('epochs', 1), ('lr', 0.01), ('method', 'softtarget'), ('weight', 0.5),
                           ('teacher', 'trained by the job'), ('student_arch', 'xresnet18(widen=0.25)'),
                           ('kd_loss', 'SoftTarget(T=4.0, standardize=False)'), ('data', few_digits),
                           ('data_fingerprint', '')):
        assert f'| {setting} | {value}' in header
    results = pd.read_csv(out/'results.csv', index_col='model')
    assert (results.command == f'{command} --data {few_digits} --out {out}').all()
    assert (results.job_seed == 42).all() and (results['size'] == 16).all() and (results.fastai != '').all()


@pytest.fixture(scope='module')
def whole_job(few_digits, tmp_path_factory):
    "The report folder of JOB run without interruption"
    out = tmp_path_factory.mktemp('whole')/'report'
    assert main([*JOB, '--data', str(few_digits), '--out', str(out)]) == 0
    return out


def _runs(out) -> dict:
    "The finished runs kept in `out`: their record files and when each was written"
    return {f.name: f.stat().st_mtime_ns for f in (out/'runs').glob('*.json') if f.name != 'settings.json'}


def test_a_killed_job_resumes_without_retraining_and_reports_as_an_uninterrupted_one(whole_job, few_digits, tmp_path):
    job = [str(FASTKD), *JOB, '--data', str(few_digits), '--out']
    whole, killed = whole_job, tmp_path/'killed'
    process = subprocess.Popen([*job, str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed/'runs'/'student-seed42.json').exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-run: the teacher and at least the first student have ended
    assert process.wait() == -signal.SIGKILL and not (killed/'report.md').exists()
    finished = _runs(killed)
    assert {'teacher-seed42.json', 'student-seed42.json'} <= set(finished) < set(_runs(whole))

    rerun = subprocess.run([*job, str(killed)], check=True, capture_output=True, text=True)
    names = sorted(f.removesuffix('.json').replace('-seed', ' seed ').replace('distilled-', 'distilled ')
                   for f in finished)
    assert f'Reused the runs kept in {killed/"runs"}: ' in rerun.stdout
    reused = rerun.stdout.split('Reused the runs kept in ')[1].split(': ', 1)[1].split('.\n')[0]
    assert sorted(reused.split(', ')) == names
    assert all(_runs(killed)[name] == written for name, written in finished.items())  # not trained again
    assert set(_runs(killed)) == set(_runs(whole))

    expected, resumed = (pd.read_csv(out/'results.csv', index_col='model') for out in (whole, killed))
    pd.testing.assert_frame_equal(resumed[SCORES], expected[SCORES])
    weights = [torch.load(out/'student.pth', weights_only=True) for out in (whole, killed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    verdicts = [[line for line in (out/'report.md').read_text().splitlines() if line.startswith('**')]
                for out in (whole, killed)]
    assert verdicts[0] and verdicts[0] == verdicts[1]


def test_other_settings_in_the_same_folder_are_refused_with_the_fix(few_digits, tmp_path):
    out = tmp_path/'report'
    assert main([*JOB, '--seeds', '1', '--data', str(few_digits), '--out', str(out)]) == 0
    kept = _runs(out)
    with pytest.raises(SystemExit, match=r"fastkd: .*report holds runs of a job with other settings \(kd_weight: 0\.5 "
                       r"then, 0\.3 now; weight: 0\.5 then, 0\.3 now\)\. Run again with the same settings to resume "
                       r"it, pass another --out for this job, or delete .*runs to start again\."):
        main([*JOB, '--seeds', '1', '--data', str(few_digits), '--out', str(out), '--weight', '0.3'])
    assert _runs(out) == kept
    assert main([*JOB, '--data', str(few_digits), '--out', str(out)]) == 0  # more seeds: the same job, one seed more
    assert all(_runs(out)[name] == written for name, written in kept.items())
    assert set(_runs(out)) - set(kept) == {'student-seed43.json', 'distilled-student-seed43.json'}


def test_settings_equal_as_json_resume_and_others_are_refused(tmp_path):
    "settings.json gives tuples back as lists: (32, 32) then is [32, 32] now"
    RunStore(tmp_path/'runs', {'size': (32, 32), 'data': 'digits'})
    assert RunStore(tmp_path/'runs', {'size': (32, 32), 'data': 'digits'}).settings['size'] == (32, 32)
    with pytest.raises(FileExistsError, match=r'other settings \(size: \[32, 32\] then, \[16, 16\] now\)'):
        RunStore(tmp_path/'runs', {'size': (16, 16), 'data': 'digits'})


def test_the_same_job_from_another_folder_resumes(few_digits, tmp_path, monkeypatch, capsys):
    "--data ./digits from one folder, ../digits from another: the same data, the same job"
    (tmp_path/'digits').symlink_to(few_digits, target_is_directory=True)
    (tmp_path/'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path)
    assert main([*JOB, '--seeds', '1', '--data', './digits', '--out', 'report']) == 0
    kept = _runs(tmp_path/'report')
    monkeypatch.chdir(tmp_path/'elsewhere')
    capsys.readouterr()
    assert main([*JOB, '--seeds', '1', '--data', '../digits', '--out', '../report']) == 0
    assert ('Reused the runs kept in ../report/runs: teacher seed 42, student seed 42, distilled student seed 42.'
            in capsys.readouterr().out)
    assert _runs(tmp_path/'report') == kept


def _cut(path):
    "What a crash can leave at `path`: its first half"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_runs_a_crash_left_half_written_train_again_and_whole_ones_are_reused(whole_job, few_digits, tmp_path):
    """A job killed or powered off at any point: between a run's weights and its record, while writing a record
    (a temporary file), or before a rename reached the disk (a file cut short or empty, as writes without fsync could
    leave it). Resumed, it retrains those runs, reuses the whole one and reports as an uninterrupted job."""
    out = tmp_path/'crashed'
    shutil.copytree(whole_job, out)
    runs = out/'runs'
    _cut(runs/'teacher-seed42.pth')  # weights cut short under a whole record
    _cut(runs/'student-seed42.json')  # a record cut short
    (runs/'student-seed43.pth').write_bytes(b'')  # weights renamed into place, their data lost
    (runs/'distilled-student-seed43.json').unlink()  # killed between the weights and the record...
    (runs/'.distilled-student-seed43.json.0123abcd.tmp').write_text('{"row": {"mod')  # ...while writing it
    with pytest.warns(UserWarning, match='is incomplete .*training it again') as warned:
        assert main([*JOB, '--data', str(few_digits), '--out', str(out)]) == 0
    assert sorted(str(w.message).split(' kept in ')[0] for w in warned if 'is incomplete' in str(w.message)) == [
        'The student of seed 42', 'The student of seed 43', 'The teacher of seed 42']
    assert _runs(out).keys() == _runs(whole_job).keys()
    assert _runs(out)['distilled-student-seed42.json'] == _runs(whole_job)['distilled-student-seed42.json']  # reused
    expected, resumed = (pd.read_csv(folder/'results.csv', index_col='model') for folder in (whole_job, out))
    pd.testing.assert_frame_equal(resumed[SCORES], expected[SCORES])
    for name in ('teacher-seed42.pth', 'student-seed43.pth'):
        weights = [torch.load(folder/'runs'/name, weights_only=True) for folder in (whole_job, out)]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
