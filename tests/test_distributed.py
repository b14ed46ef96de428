"Distillation under fastai's distributed training: two CPU processes (gloo) against one process on the same global batches, hints included."
import json
import os
import subprocess
import sys
from pathlib import Path

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import numpy as np
import pytest
import torch

import distributed_kd
from distributed_kd import BS, STEPS, adapters, agreement_learner, global_batches, hint, learner

pytest.importorskip('accelerate', reason="fastai's distrib_ctx needs accelerate (a dev requirement)")


def test_two_processes_match_one_on_the_same_global_batches(digits_path, teacher, tmp_path):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    torch.save(teacher.model.state_dict(), tmp_path/'teacher.pth')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               distributed_kd.__file__, str(digits_path), str(tmp_path), str(tmp_path/'teacher.pth')]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if 'terminate called without an active exception' in run.stderr:  # gloo's threads aborted a process (seen once
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)  # under load): once more
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path/f'rank{r}.json').read_text()) for r in range(2)]
    for rank in ranks:
        assert rank['world_size'] == 2 and len(rank['losses']) == STEPS
        assert rank['wrapped'] == ['student DistributedDataParallel', 'teacher Sequential']  # the teacher is not wrapped
    assert ranks[0]['losses'] != ranks[1]['losses']  # each process distils its own shard
    assert all(rank['cached_items'] == 8 * BS + BS for rank in ranks)  # its 8 batches once, and 1 check batch
    # a shared store over 3 shuffled epochs: the teacher runs on each item once across the processes (each process
    # with its own outputs would run on 7/4 of them: half of epoch 2's items and 3/4 of epoch 3's are new to it)
    assert sum(rank['stored_items'] - BS for rank in ranks) == 2 * 8 * BS
    [filled] = (tmp_path/'store').glob('*/filled.npy')
    assert np.load(filled).sum() == 2 * 8 * BS

    def single_process(**kwargs):
        "The learner of one process on the global batches of the two, trained as many steps"
        single = learner(digits_path, 2 * BS, **kwargs)
        order = global_batches(len(single.dls.train.dataset), world_size=2)
        single.dls.train = single.dls.train.new(get_idxs=lambda: order)
        with single.no_bar(), single.no_logging(): single.fit(1, 1e-2)
        return single

    def mean_of_processes(losses: list[list[float]]) -> list[float]: return [(a + b) / 2 for a, b in zip(*losses)]

    single = single_process()  # steps after the first: the same updates
    assert mean_of_processes([r['losses'] for r in ranks]) == pytest.approx(single.record_steps.losses, rel=1e-5)

    # hints: the adapters stay the same in both processes, and train as one process's do on the global batches
    assert ranks[0]['hinted']['losses'] != ranks[1]['hinted']['losses']
    assert ranks[0]['hinted']['adapters'] == ranks[1]['hinted']['adapters']
    single = single_process(hints=[hint(adapter=True)])
    assert mean_of_processes([r['hinted']['losses'] for r in ranks]) == pytest.approx(single.record_steps.losses,
                                                                                rel=1e-5)
    assert ranks[0]['hinted']['adapters'] == pytest.approx(adapters(single), rel=1e-4, abs=1e-6)
    # adapters made at the first step from each process's own random state: process 0's are taken by both
    assert ranks[0]['lazy']['adapters'] == ranks[1]['lazy']['adapters']

    # TeacherAgreement counts the whole validation set once, as one process does: not each process's half (sorted by
    # digit, the halves disagree), nor process 1's padding item twice
    single = agreement_learner(digits_path, tmp_path/'teacher.pth')
    with single.no_bar(): single.validate()
    student_preds, _ = single.get_preds()
    teacher_preds, _ = teacher.get_preds(dl=single.dls.valid)
    whole = (student_preds.argmax(1) == teacher_preds.argmax(1)).float().mean().item()
    assert single.metrics[0].value == pytest.approx(whole) and 0 < whole < 1
    assert [rank['agreement'] for rank in ranks] == [pytest.approx(whole), pytest.approx(whole)]
