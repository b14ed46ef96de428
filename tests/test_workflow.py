"The main job over several seeds: paired runs, one teacher, the per-model summary and the verdict's rule."
import statistics
from functools import partial

import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.vision.models.xresnet import xresnet18

from fastkd.digits import digits_dls
from fastkd.kd_find import frozen_at, kd_find_for_job
from fastkd.losses import DIST, SoftTarget
from fastkd.report import write_report
from fastkd.workflow import Schedule, distillation_job, distillation_verdict, kd_method, scratch_learner, seed_summary
from test_kd_find import away_from_teacher

TINY_ARCH = partial(xresnet18, widen=0.25)


def results(alone: list[float], distilled: list[float], seeds=(1, 2, 3)) -> pd.DataFrame:
    "A results table as `distillation_job` makes it: a teacher row, then the two students of each seed"
    rows = [dict(model='teacher', seed=seeds[0], test_f1=0.99)]
    for seed, a, d in zip(seeds, alone, distilled):
        rows += [dict(model='student', seed=seed, test_f1=a), dict(model='distilled student', seed=seed, test_f1=d)]
    return pd.DataFrame(rows).set_index('model')


CI = '(95% confidence interval of the mean gain:'


@pytest.mark.parametrize('alone,distilled,verdict', [
    ([0.90, 0.91, 0.92], [0.93, 0.935, 0.95], f'Distillation gained: it changed test_f1 by +2.8 +- 0.3 points over 3 '
                                              f'seeds {CI} +2.1 to +3.6).'),
    ([0.90, 0.91, 0.92], [0.95, 0.90, 0.93], f'No gain shown: distillation changed test_f1 by +1.7 +- 3.1 points '
                                             f'over 3 seeds {CI} -5.9 to +9.3, which includes zero; student alone: '
                                             '+- 1.0).'),
    ([0.88, 0.90, 0.92], [0.895, 0.915, 0.935], f'Distillation gained: it changed test_f1 by +1.5 +- 0.0 points over 3 '
                                                f'seeds {CI} +1.5 to +1.5).'),
    ([0.90, 0.91, 0.92], [0.88, 0.89, 0.905], f'Distillation cost: it changed test_f1 by -1.8 +- 0.3 points over 3 '
                                              f'seeds {CI} -2.6 to -1.1).')])
def test_verdict_claims_a_gain_only_when_the_confidence_interval_is_above_zero(alone, distilled, verdict):
    """Noisy gains are no gain; a gain of every seed smaller than the student's own spread is one when it is steady
    (the interval narrows with the spread of the gains, not of the runs); losses on every seed are a cost"""
    assert distillation_verdict(results(alone, distilled)) == verdict


def test_more_seeds_show_a_gain_that_few_seeds_cannot():
    "The same gains, mean 1.5 and spread 1.3, are no gain over 3 seeds and a gain over 8: the interval narrows"
    gains = [0.0, 3.0, 1.5, 0.5, 2.5, 1.0, 3.0, 0.5]
    alone = [0.9] * 8
    distilled = [a + g / 100 for a, g in zip(alone, gains)]
    assert distillation_verdict(results(alone[:3], distilled[:3])).startswith('No gain shown')
    assert distillation_verdict(results(alone, distilled, seeds=range(8))).startswith('Distillation gained: it changed '
                                                                                       'test_f1 by +1.5')


def test_verdict_pairs_runs_by_seed_not_by_row_order():
    table = results([0.90, 0.92], [0.93, 0.95], seeds=(7, 8))
    shuffled = pd.concat([table.iloc[[0, 3, 4]], table.iloc[[1, 2]]])  # seed 8's runs first
    assert distillation_verdict(shuffled) == distillation_verdict(table) == \
        f'Distillation gained: it changed test_f1 by +3.0 +- 0.0 points over 2 seeds {CI} +3.0 to +3.0).'


def test_verdict_on_one_seed_asks_for_more():
    verdict = distillation_verdict(results([0.9], [0.95], seeds=(1,)))
    assert verdict.startswith("Distillation changed the student's test_f1 by +5.0 points on one seed")
    assert verdict.endswith('this says nothing yet (run with --seeds 3 or more).')


def test_seed_summary_gives_mean_and_sample_std_per_model():
    table = results([0.90, 0.91, 0.95], [0.93, 0.935, 0.95]).assign(valid_accuracy=0.5, train_s=1.)
    summary = seed_summary(table)
    assert list(summary.index) == ['teacher', 'student', 'distilled student']
    assert list(summary.seeds) == [1, 3, 3]
    assert summary.at['student', 'test_f1_mean'] == pytest.approx(statistics.mean([0.90, 0.91, 0.95]))
    assert summary.at['student', 'test_f1_std'] == pytest.approx(statistics.stdev([0.90, 0.91, 0.95]))
    assert pd.isna(summary.at['teacher', 'test_f1_std'])  # one run: no spread


@pytest.mark.parametrize('method,mix,alpha,loss,mix_cb', [
    ('softtarget', 'mixup', None, SoftTarget, None), ('dist', 'mixup', None, DIST, None),
    ('fm', 'mixup', None, SoftTarget, MixUp), ('fm', 'cutmix', 0.3, SoftTarget, CutMix)])
def test_kd_method_builds_the_loss_and_the_mixing_of_function_matching(method, mix, alpha, loss, mix_cb):
    kd_loss, make_mix = kd_method(method, mix, alpha, T=3)
    assert type(kd_loss) is loss and kd_loss.T == 3
    if mix_cb is None:
        assert make_mix is None
    else:
        first, second = make_mix(), make_mix()
        assert type(first) is mix_cb and first is not second  # a fresh callback for every learner
        expected = alpha if alpha is not None else mix_cb().distrib.concentration1.item()  # fastai's default
        assert first.distrib.concentration1.item() == pytest.approx(expected)


def test_unknown_method_or_mix_names_the_choices():
    with pytest.raises(ValueError, match="Unknown method 'kd': choose one of softtarget, dkd, dist, fm"):
        kd_method('kd')
    with pytest.raises(ValueError, match="Unknown mix 'mixin': choose one of mixup, cutmix"): kd_method('fm', 'mixin')


def test_each_seed_pairs_the_student_alone_with_the_distilled_student(few_digits):
    """With a distillation weight of 0 the distilled student must end exactly where the student alone ends: same
    initial weights, same batches, same augmentation draws within a seed. The teacher is taken once (its row has
    the schedule's seed)."""
    dls = digits_dls(few_digits, size=16, bs=30, num_workers=0)
    teacher = scratch_learner(dls, TINY_ARCH, seed=0).model
    job = distillation_job(dls, dls.test_dl(sorted((few_digits/'test').glob('*/*.png'))),
                           [int(f.parent.name) for f in sorted((few_digits/'test').glob('*/*.png'))],
                           TINY_ARCH, TINY_ARCH, Schedule(freeze_epochs=0, epochs=2, lr=1e-2), teacher=teacher,
                           kd_loss=SoftTarget(T=4), kd_weight=0., n_augs=[1], seeds=[5, 6])
    table = job['table']
    assert list(zip(table.index, table.seed)) == [('teacher', 42), ('student', 5), ('distilled student', 5),
                                                  ('student', 6), ('distilled student', 6)]
    assert 'teacher' not in job['training'] and pd.isna(table.loc['teacher', 'train_s'])
    for seed in (5, 6):
        runs = table[table.seed == seed].drop(index='teacher', errors='ignore')
        assert runs.valid_accuracy.nunique() == 1 and runs.test_f1.nunique() == 1
    alone, distilled = (job['learners'][name].model.state_dict() for name in ('student', 'distilled student'))
    assert all(torch.equal(alone[k], distilled[k]) for k in alone)  # seed 5's models, kept for the report
    initial = scratch_learner(dls, TINY_ARCH, seed=5).model.state_dict()
    assert not torch.equal(alone['0.0.0.weight'], initial['0.0.0.weight'])  # and they did train
    assert list(job['summary'].seeds) == [1, 2, 2]
    assert job['verdict'].startswith('No gain shown: distillation changed test_f1 by +0.0 +- 0.0')


class TeacherCalls(Callback):
    "Passed as the job's `mix`, so it joins the distilled student's learner alone: counts its teachers' forwards"
    made = []
    def __init__(self): self.calls, self.hooks = 0, []; TeacherCalls.made.append(self)
    def before_fit(self):
        self.hooks = [t.register_forward_hook(self.count) for t in self.learn.knowledge_distillation.teachers]
    def count(self, *_): self.calls += 1
    def after_fit(self):
        for hook in self.hooks: hook.remove()


def test_the_distilled_student_is_distilled(few_digits):
    "Its training called the teacher and logged a distillation term; the student alone logged none"
    dls = digits_dls(few_digits, size=16, bs=30, num_workers=0)
    files = sorted((few_digits/'test').glob('*/*.png'))
    TeacherCalls.made.clear()
    job = distillation_job(dls, dls.test_dl(files), [int(f.parent.name) for f in files], TINY_ARCH, TINY_ARCH,
                           Schedule(freeze_epochs=0, epochs=1, lr=1e-2),
                           teacher=scratch_learner(dls, TINY_ARCH, 0).model,
                           kd_weight=0.5, n_augs=[1], mix=TeacherCalls)
    assert len(TeacherCalls.made) == 1 and TeacherCalls.made[0].calls >= len(dls.train)  # every step, and the check
    distilled, alone = (job['training'][name]['epochs'] for name in ('distilled student', 'student'))
    assert (distilled.train_kd > 0).all() and 'train_kd' not in alone


def test_when_kd_find_finds_nothing_that_pays_the_students_train_alone(few_digits, tmp_path):
    """`choose` (what --method auto passes): a candidate that pushes the student away from the teacher (0.91 validation
    accuracy after 6 epochs) never pays, so no student is distilled and the report says why; kd_find's result is kept"""
    dls = digits_dls(few_digits, size=16, bs=30, num_workers=0)
    files = sorted((few_digits/'test').glob('*/*.png'))
    schedule = Schedule(freeze_epochs=0, epochs=2, lr=1e-2)
    choose = partial(kd_find_for_job, dls, TINY_ARCH, schedule=schedule, show_progress=False,
                     candidates={'away': dict(loss=away_from_teacher, weight=0.9)})
    job = distillation_job(dls, dls.test_dl(files), [int(f.parent.name) for f in files], TINY_ARCH, TINY_ARCH,
                           schedule, teacher_epochs=6, n_augs=[1], seeds=[5, 6], choose=choose, runs=tmp_path/'runs')
    assert job['kd_find']['name'] == 'away' and not job['kd_find']['paid']
    assert job['kd_find']['table'].loc['away', 'gain'] < 0
    assert list(zip(job['table'].index, job['table'].seed)) == [('teacher', 42), ('student', 5), ('student', 6)]
    assert list(job['learners']) == ['teacher', 'student'] and 'train_kd' not in job['training']['student']['epochs']
    assert job['verdict'].startswith('kd_find: No candidate showed a gain over the student alone')
    assert job['verdict'].endswith('So the students trained alone.')
    assert job['settings']['kd_loss'] == "'chosen by kd_find'" and job['settings']['mix'] is None
    assert (tmp_path/'runs'/'kd_find-seed42.json').exists()
    report = write_report(job, tmp_path/'report').read_text()
    assert report.startswith('# fastkd distillation report: the student alone (kd_find: no method paid)')
    assert 'The students trained alone: no candidate paid (the best, away, showed no gain' in report
    assert '| away | ' in report and (tmp_path/'report'/'kd_find.png').exists()
    assert 'TTA sweep of the student' in report
    saved = torch.load(tmp_path/'report'/'student.pth', weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in job['learners']['student'].model.state_dict().items())


class FitLog(Callback):
    "Each fit's epochs, and whether every weight of the student trained in it (not with its body frozen)"
    def __init__(self): self.fits = []
    def before_fit(self): self.fits.append((self.n_epoch, all(p.requires_grad for p in self.model.parameters())))


def test_kd_find_for_the_job_freezes_the_body_first_at_the_planned_schedule_only(few_digits):
    "Early rungs only rank the candidates: they train unfrozen from the start; the last rung trains as the job does"
    learn = scratch_learner(digits_dls(few_digits, size=16, bs=30, num_workers=0), TINY_ARCH, 0)
    log, fit = FitLog(), frozen_at(epochs=2, freeze_epochs=1)
    with learn.no_bar(), learn.no_logging():
        fit(learn, 1, 1e-2, [log])
        fit(learn, 2, 1e-2, [log])
    assert log.fits == [(1, True), (1, False), (2, True)]
