"TTA sweeps on a tiny CNN trained on the digits image folder, checked against `Learner.get_preds`, `Learner.tta` and scikit-learn."
from functools import partial

import numpy as np
import pytest
import torch
from fastai.vision.all import (Callback, ConvLayer, CrossEntropyLossFlat, Flatten, Learner, PILImage, RandTransform,
                               TensorImage, Transform, get_image_files, set_seed)
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn

import fastkd.tta as tta
from fastkd.callback import KnowledgeDistillation
from fastkd.digits import digits_dls

weighted_f1 = partial(f1_score, average='weighted')


def tiny_cnn(width: int = 16) -> nn.Module:
    return nn.Sequential(ConvLayer(3, width, stride=2), ConvLayer(width, width, stride=2), ConvLayer(width, width, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(width, 10))


@pytest.fixture(scope='module')
def learn(digits_path) -> Learner:
    "A tiny CNN trained briefly on the digits, with the usual (random) augmentation in its batch transforms"
    torch.set_num_threads(1)
    set_seed(42, reproducible=True)
    learn = Learner(digits_dls(digits_path, num_workers=0), tiny_cnn(), loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 2e-2)
    return learn


@pytest.fixture(scope='module')
def test_files(digits_path) -> list:
    return get_image_files(digits_path/'test')[::2]  # 180 of the 359 test digits keep passes short


def labels_of(files) -> list[str]: return [f.parent.name for f in files]


class PassRecorder(Callback):
    "Records the split of the transforms each prediction pass used: 0 augments, 1 does not"
    def before_fit(self): self.splits = getattr(self, 'splits', [])
    def before_validate(self): self.splits.append(self.dl.dataset.split_idx)


class Mirror(Transform):
    "A deterministic augmentation: flip images left to right, in the training split only"
    split_idx, order = 0, 90
    def encodes(self, x: TensorImage): return x.flip(-1)


def test_plain_pass_is_get_preds(learn, test_files):
    dl = learn.dls.test_dl(test_files, with_labels=True)
    probs, _ = tta.tta_preds(learn, dl, [0])
    expected, targets = learn.get_preds(dl=dl)
    assert torch.equal(probs[0], expected)
    assert (expected.argmax(1) == targets).float().mean() > 0.6  # a trained model, not constant predictions
    results = tta.test_time_aug(learn, dl, labels_of(test_files), weighted_f1, n_augs=[0])
    assert results.score[0] == pytest.approx(f1_score(targets, expected.argmax(1), average='weighted'))


def test_sweep_prints_only_when_verbose(learn, test_files, capsys):
    dl = learn.dls.test_dl(test_files[:16], with_labels=True)
    rows = lambda: [line for line in capsys.readouterr().out.splitlines() if line.startswith('n_aug=')]  # not the bars
    results = tta.test_time_aug(learn, dl, labels_of(test_files[:16]), weighted_f1, n_augs=[0, 1])
    assert rows() == []  # notebooks show the returned table once
    tta.test_time_aug(learn, dl, labels_of(test_files[:16]), weighted_f1, n_augs=[0, 1], verbose=True)
    assert [line[:9] for line in rows()] == [f'n_aug={n:>3}' for n in results.n_aug]


def test_sweep_equals_learner_tta_with_seeded_augmentation(learn, test_files):
    dl = learn.dls.test_dl(test_files)
    set_seed(7)
    probs, _ = tta.tta_preds(learn, dl, [0, 1, 3], beta=0.25)
    for n in (1, 3):
        set_seed(7)
        assert torch.equal(probs[n], learn.tta(dl=dl, n=n, beta=0.25)[0])
    assert not torch.equal(probs[3], probs[0])


def test_sweep_equals_learner_tta_with_deterministic_augmentation(learn, test_files):
    dl = learn.dls.test_dl(test_files)
    dl = dl.new(after_batch=[t for t in dl.after_batch.fs if not isinstance(t, RandTransform)] + [Mirror()])
    set_seed(1)
    probs, _ = tta.tta_preds(learn, dl, [0, 1, 2], beta=0.1)
    set_seed(2)  # another seed: nothing random is left
    mirrored = learn.tta(dl=dl, n=2, beta=0.1)[0]
    assert torch.allclose(probs[2], mirrored, atol=1e-6) and torch.allclose(probs[1], mirrored, atol=1e-6)
    plain = learn.get_preds(dl=dl)[0]
    flipped = learn.get_preds(dl=learn.dls.test_dl([PILImage(Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
                                                    for f in test_files]))[0]
    assert torch.allclose(probs[2], torch.lerp(flipped, plain, 0.1), atol=1e-5)


@pytest.mark.parametrize('invert', [False, True])
def test_masked_scores_match_sklearn(learn, test_files, invert):
    labels = labels_of(test_files)
    mask = tta.class_mask(labels, ['3', '5', '8'], invert=invert)
    assert 0 < mask.sum() < len(mask)
    dl = learn.dls.test_dl(test_files)
    seen = []
    def recording_f1(y_true, y_pred):
        seen.append(y_true)
        return weighted_f1(y_true, y_pred)
    set_seed(3)
    results = tta.test_time_aug(learn, dl, labels, recording_f1, n_augs=[0, 2], mask=mask).set_index('n_aug')
    set_seed(3)
    expected = {2: learn.tta(dl=dl, n=2, beta=0.1)[0], 0: learn.get_preds(dl=dl)[0]}  # tta first: same random state
    y_true = np.array(labels, dtype=int)  # the digits vocab is '0'..'9', so labels and indices agree
    for n, probs in expected.items():
        assert results.score[n] == pytest.approx(f1_score(y_true[mask], probs[mask].argmax(1), average='weighted'))
    assert np.array_equal(seen[0], y_true[mask])  # called as metric(y_true, y_pred)
    by_index = tta.test_time_aug(learn, dl, labels, weighted_f1, n_augs=[0], mask=np.flatnonzero(mask).tolist())
    assert by_index.score[0] == results.score[0]


def test_sweep_costs_max_n_plus_one_passes(learn, test_files):
    dl = learn.dls.test_dl(test_files[::6])
    recorder = PassRecorder()
    with learn.added_cbs(recorder):
        results = tta.test_time_aug(learn, dl, labels_of(test_files[::6]), weighted_f1, n_augs=[0, 5, 10, 20, 30])
    assert recorder.splits == [0] * 30 + [1]  # 30 augmented passes, then the plain one: 31, not 70 as one tta per setting
    assert results.n_aug.tolist() == [0, 5, 10, 20, 30] and list(results.columns) == ['n_aug', 'score', 'time']
    assert (results.time > 0).all() and results.time.is_monotonic_increasing


def test_unlabelled_test_set_scores_as_labelled(learn, test_files):
    unlabelled, labelled = learn.dls.test_dl(test_files), learn.dls.test_dl(test_files, with_labels=True)
    assert len(unlabelled.dataset[0]) == 1 and len(labelled.dataset[0]) == 2
    scores = []
    for dl in (unlabelled, labelled):
        set_seed(5)
        scores.append(tta.test_time_aug(learn, dl, labels_of(test_files), weighted_f1, n_augs=[0, 1]).score.tolist())
    assert scores[0] == scores[1]


def test_knowledge_distillation_callback_attached(learn, test_files):
    dl = learn.dls.test_dl(test_files)
    set_seed(6)
    without = tta.test_time_aug(learn, dl, labels_of(test_files), weighted_f1, n_augs=[0, 1])
    logger = learn.logger
    with learn.added_cbs(KnowledgeDistillation(tiny_cnn(8))):
        set_seed(6)
        with_kd = tta.test_time_aug(learn, dl, labels_of(test_files), weighted_f1, n_augs=[0, 1])
    assert with_kd.score.tolist() == without.score.tolist()
    assert learn.logger == logger  # the learner still logs its training as before


def test_class_mask_by_label_index_and_inverted():
    y_true, vocab = np.array(['0', '3', '5', '3', '9']), [str(i) for i in range(10)]
    wanted = [False, True, True, True, False]
    assert tta.class_mask(y_true, ['3', '5']).tolist() == wanted
    assert tta.class_mask(y_true, {'3', '5'}, invert=True).tolist() == [not w for w in wanted]
    assert tta.class_mask(y_true, [3, 5], vocab=vocab).tolist() == wanted
    assert tta.class_mask(torch.tensor([0, 3, 5, 3, 9]), ['3', '5'], vocab=vocab).tolist() == wanted
    with pytest.raises(TypeError, match='pass the vocab'): tta.class_mask(y_true, [3, 5])
    with pytest.raises(ValueError, match=r"classes has labels .* does not cover: stop"):
        tta.class_mask(y_true, ['stop'], vocab=vocab)


@pytest.mark.parametrize('change, error, message', [
    (dict(y_true=lambda y: y[:-1]), ValueError, r'y_true has 29 labels for 30 test items'),
    (dict(mask=lambda y: tta.class_mask(y, list('0123456789'), invert=True)), ValueError, 'selects no test items'),
    (dict(mask=lambda y: [0, 30]), ValueError, r'outside 0\.\.29: 30'),
    (dict(n_augs=[0, -2]), ValueError, r'cannot be negative, got \[-2\]'),
    (dict(n_augs=[0, 5, 5]), ValueError, r'lists \[5\] more than once'),
    (dict(y_true=lambda y: y[:-1] + ['stop']), ValueError, "vocab does not cover: stop"),
    (dict(y_true=lambda y: [10] * len(y)), ValueError, r"10 classes do not cover: 10"),
    (dict(beta=1.5), ValueError, 'beta .* between 0 and 1'),
    (dict(test_dataloader=torch.utils.data.DataLoader(range(30))), TypeError, 'fastai DataLoader'),
])
def test_bad_input_is_a_clear_error_before_any_pass(learn, test_files, change, error, message):
    files = test_files[:30]
    args = dict(test_dataloader=learn.dls.test_dl(files), y_true=labels_of(files), metric=weighted_f1, n_augs=[0, 1])
    for name, value in change.items(): args[name] = value(labels_of(files)) if callable(value) else value
    recorder = PassRecorder()
    with learn.added_cbs(recorder), pytest.raises(error, match=message): tta.test_time_aug(learn, **args)
    assert getattr(recorder, 'splits', []) == []


def test_plot_tta_renders_png(learn, test_files, tmp_path):
    files = test_files[::3]
    results = tta.test_time_aug(learn, learn.dls.test_dl(files), labels_of(files), weighted_f1, n_augs=[2, 0, 1])
    fig = tta.plot_tta(results)
    score_ax, time_ax = fig.axes
    assert score_ax.lines[0].get_xdata().tolist() == [0, 1, 2]
    assert score_ax.lines[0].get_ydata().tolist() == results.sort_values('n_aug').score.tolist()
    assert time_ax.lines[0].get_ydata().tolist() == results.sort_values('n_aug').time.tolist()
    fig.savefig(tmp_path/'tta.png', dpi=50)
    with Image.open(tmp_path/'tta.png') as image: assert image.format == 'PNG' and image.size == (300, 200)


def test_test_time_aug_is_not_collected_by_pytest():
    assert tta.test_time_aug.__test__ is False
