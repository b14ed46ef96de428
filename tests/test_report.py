"The compression report on real models, the per-class table and confusion matrix against scikit-learn."
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.vision.all import ConvLayer, CrossEntropyLossFlat, Flatten, Learner, get_image_files
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from fastkd.digits import digits_dls
from fastkd.compression import compare_models, compression_summary
from fastkd.report import per_class_table, plot_confusion
from fastkd.tta import class_mask


def cnn(width: int) -> nn.Module:
    return nn.Sequential(ConvLayer(3, width, stride=2), ConvLayer(width, width, stride=2), nn.AdaptiveAvgPool2d(1),
                         Flatten(), nn.Linear(width, 10))


def test_compare_models_counts_sizes_and_times(digits_path, tmp_path):
    teacher, student = cnn(32).train(), cnn(8)
    learner = Learner(digits_dls(digits_path, num_workers=0), student, loss_func=CrossEntropyLossFlat())
    report = compare_models(teacher, learner, input_size=(3, 32, 32), batch_size=8, n_repeats=3, n_warmup=1)
    assert list(report.columns) == ['teacher', 'student', 'student/teacher']
    assert list(report.index) == ['parameters', 'size_mb', 'latency_ms', 'throughput_per_s']
    for name, model in (('teacher', teacher), ('student', student)):
        assert report.loc['parameters', name] == sum(p.numel() for p in model.parameters())
        torch.save(model.state_dict(), tmp_path/f'{name}.pth')
        assert report.loc['size_mb', name] * 2**20 == pytest.approx((tmp_path/f'{name}.pth').stat().st_size, rel=0.01)
    assert (report.loc[['latency_ms', 'throughput_per_s'], ['teacher', 'student']] > 0).all().all()
    assert report['student/teacher'].tolist() == pytest.approx((report.student / report.teacher).tolist())
    assert report.loc['parameters', 'student/teacher'] < 0.1
    assert teacher.training and student.training  # the report times copies: the models are left as they were
    summary = compression_summary(report)
    assert f"{report.loc['parameters', 'student/teacher']:.1%} of the teacher's parameters" in summary
    assert f"{report.loc['latency_ms', 'teacher'] / report.loc['latency_ms', 'student']:.1f}x faster" in summary


def test_compare_models_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match=r'student must be a torch `nn.Module` or a fastai `Learner`, got str'):
        compare_models(cnn(8), 'resnet18')
    with pytest.raises(ValueError, match='n_repeats >= 1'): compare_models(cnn(8), cnn(4), n_repeats=0)


@pytest.fixture
def predictions():
    "True labels of 200 items over 6 classes and noisy predictions (a quarter of them replaced at random)"
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, 200)
    y_pred = np.where(rng.random(200) < 0.25, rng.integers(0, 6, 200), y_true)
    return y_true, y_pred


VOCAB = ['00', '01', '02', '03', '04', '05']
NAMES = {0: 'speed 20', 1: 'speed 30', 2: 'speed 50', 3: 'speed 60', 4: 'speed 70', 5: 'speed 80'}


def test_per_class_table_matches_sklearn_on_masked_items(predictions):
    y_true, y_pred = predictions
    mask = class_mask(y_true, [1, 2, 4])
    table = per_class_table(y_true, y_pred, vocab=VOCAB, names=NAMES, mask=mask)
    expected = precision_recall_fscore_support(y_true[mask], y_pred[mask], labels=table.index, zero_division=0)
    for column, values in zip(['precision', 'recall', 'f1', 'support'], expected):
        assert table[column].tolist() == pytest.approx(values.tolist())
    assert table.index.tolist() == [1, 2, 4] and (table.support > 0).all()  # a row per true class of the masked items
    assert table.loc[2, 'label'] == '02' and table.loc[2, 'name'] == 'speed 50'
    probs = np.eye(6)[y_pred] * 0.8 + 0.02  # probabilities give the same table as their argmax
    pd.testing.assert_frame_equal(per_class_table(y_true, torch.tensor(probs), vocab=VOCAB, names=NAMES, mask=mask), table)
    labelled = per_class_table(np.array(VOCAB)[y_true], y_pred, vocab=VOCAB, mask=mask)
    assert labelled[['precision', 'recall', 'f1', 'support']].equals(table[['precision', 'recall', 'f1', 'support']])


def test_per_class_table_bad_input(predictions):
    y_true, y_pred = predictions
    with pytest.raises(ValueError, match='y_true has 199 items and y_pred 200'): per_class_table(y_true[1:], y_pred)
    with pytest.raises(ValueError, match="names has no entry for class '05'"):
        per_class_table(y_true, y_pred, vocab=VOCAB, names=list(NAMES.values())[:5])
    with pytest.raises(ValueError, match='ambiguous'):  # is 10 the class at index 10 or the class labelled '10'?
        per_class_table([0, 10, 2], [0, 1, 2], vocab=[str(i) for i in sorted(range(12), key=str)])
    with pytest.raises(ValueError, match='selects no test items'):
        per_class_table(y_true, y_pred, mask=class_mask(y_true, [7]))


def test_plot_confusion_renders_masked_matrix(predictions, tmp_path):
    y_true, y_pred = predictions
    mask = class_mask(y_true, [0, 5], invert=True)
    fig = plot_confusion(y_true, y_pred, vocab=VOCAB, mask=mask)
    ax = fig.axes[0]
    columns = np.union1d(y_true[mask], y_pred[mask])
    assert columns.tolist() == [0, 1, 2, 3, 4, 5]  # some masked items were predicted as 0 or 5, which are not in the mask
    expected = confusion_matrix(y_true[mask], y_pred[mask], labels=columns)[1:5]  # no rows for the classes masked out
    assert np.array_equal(ax.images[0].get_array(), expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == ['01', '02', '03', '04']
    assert [t.get_text() for t in ax.get_xticklabels()] == VOCAB
    assert f'({mask.sum()} items)' in ax.get_title()
    fig.savefig(tmp_path/'confusion.png', dpi=40)
    with Image.open(tmp_path/'confusion.png') as image: assert image.format == 'PNG' and image.size[0] > 100
    normalized = plot_confusion(y_true, y_pred, mask=mask, normalize=True).axes[0].images[0].get_array()
    assert np.allclose(normalized.sum(axis=1), 1)


def test_plot_confusion_of_a_learners_predictions(digits_path):
    learner = Learner(digits_dls(digits_path, num_workers=0), cnn(8), loss_func=CrossEntropyLossFlat())
    files = get_image_files(digits_path/'test')[::10]
    probs, targets = learner.get_preds(dl=learner.dls.test_dl(files, with_labels=True))
    fig = plot_confusion([f.parent.name for f in files], probs, vocab=learner.dls.vocab)
    assert fig.axes[0].images[0].get_array().sum() == len(files) == len(targets)
