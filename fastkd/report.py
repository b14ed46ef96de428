"""The report of a job, and how each class fares: `write_report` (the folder `fastkd` writes: report.md, results.csv,
plots and the distilled student's weights), `per_class_table` and `plot_confusion` (a masked test set, per class)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.mixup import CutMix, MixUp
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .basics import as_array, class_indices, mask_indices
from .callback import KnowledgeDistillation
from .compression import compression_summary
from .files import atomic_write
from .runs import environment
from .tta import plot_tta
from .workflow import VERDICT_RULE

__all__ = ['write_report', 'per_class_table', 'plot_confusion']


def _masked_classes(y_true, y_pred, vocab, mask) -> tuple[np.ndarray, np.ndarray]:
    "True and predicted class indices of the items `mask` selects; `y_pred` may be probabilities (one row per item)"
    y_true, y_pred = as_array(y_true), as_array(y_pred)
    if y_pred.ndim == 2: y_pred = y_pred.argmax(axis=1)
    if len(y_true) != len(y_pred):
        raise ValueError(f'y_true has {len(y_true)} items and y_pred {len(y_pred)}: give both for the same test items.')
    items = mask_indices(mask, len(y_true))
    return class_indices(y_true[items], vocab), class_indices(y_pred[items], vocab, 'y_pred', predicted=True)


def _class_name(names, label) -> str:
    "The name `names` gives `label`: looked up as it is, or as a number when it is digits ('00012' -> 12)"
    names = dict(names) if isinstance(names, (Mapping, pd.Series)) else dict(enumerate(names))
    if label in names: return names[label]
    if isinstance(label, str) and label.isdigit() and int(label) in names: return names[int(label)]
    raise ValueError(f'names has no entry for class {label!r}: give a name for every class (a list, dict or Series).')


def per_class_table(y_true, y_pred, vocab=None, names=None, mask=None) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class on the items `mask` selects (default: all), as scikit-learn
    computes them, one row per true class of those items. `y_true` holds class indices or labels of `vocab`, `y_pred`
    class indices or probabilities; `names` (list, dict or Series keyed by label) adds a name column."""
    y_true, y_pred = _masked_classes(y_true, y_pred, vocab, mask)
    classes = np.unique(y_true)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    labels = [vocab[i] for i in classes] if vocab is not None else classes.tolist()
    table = pd.DataFrame({'label': labels, 'precision': precision, 'recall': recall, 'f1': f1, 'support': support},
                         index=pd.Index(classes, name='class'))
    if names is not None: table.insert(1, 'name', [_class_name(names, label) for label in labels])
    return table


def plot_confusion(y_true, y_pred, vocab=None, mask=None, normalize: bool = False,
                   figsize: tuple[float, float] | None = None) -> Figure:
    """Confusion matrix of the items `mask` selects: a row per true class of those items, a column per class among
    their true or predicted classes; `normalize` divides each row by its count. Inputs as in `per_class_table`."""
    y_true, y_pred = _masked_classes(y_true, y_pred, vocab, mask)
    rows, columns = np.unique(y_true), np.union1d(y_true, y_pred)
    matrix = confusion_matrix(y_true, y_pred, labels=columns, normalize='true' if normalize else None)
    matrix = matrix[np.isin(columns, rows)]
    tick = lambda classes: [str(vocab[i]) if vocab is not None else str(i) for i in classes]
    fig = Figure(figsize=figsize or (max(4., 0.25 * len(columns) + 2.5), max(3., 0.25 * len(rows) + 1.5)))
    ax = fig.subplots()  # a Figure without pyplot: renders headless, and nothing is left open
    fig.colorbar(ax.imshow(matrix, cmap='Blues'), ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(len(columns)), yticks=range(len(rows)), xlabel='predicted', ylabel='actual',
           title=f'Confusion matrix ({len(y_true)} items)')
    ax.set_xticklabels(tick(columns), rotation=90)
    ax.set_yticklabels(tick(rows))
    if matrix.size <= 400:
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(col, row, f'{value:.2f}' if normalize else str(value), ha='center', va='center', fontsize=8,
                    color='white' if value > matrix.max() / 2 else 'black')
    fig.tight_layout()
    return fig


def _loss_figure(training: dict) -> Figure:
    """Left: each model's own loss per epoch, the base loss (cross-entropy for classification) in training and the
    plain validation loss, comparable across models; right: the distilled student's distillation terms"""
    fig = Figure(figsize=(10, 4))
    base_ax, parts_ax = fig.subplots(1, 2)
    for name, history in training.items():
        epochs = history['epochs']
        base = next(c for c in epochs.columns if c.startswith('train_') and c not in ('train_kd', 'train_hint'))
        line, = base_ax.plot(epochs[base], 'o-', label=f'{name}: {"train_loss" if base == "train_loss" else base}')
        base_ax.plot(epochs['valid_loss'], 'x--', color=line.get_color(), label=f'{name}: valid_loss')
    base_ax.set(xlabel='epoch', ylabel='loss', title="Each model's base loss (training) and validation loss")
    base_ax.legend(fontsize='small')
    epochs = training['distilled student']['epochs'] if 'distilled student' in training else pd.DataFrame()
    for column in ('train_kd', 'train_hint'):
        if column in epochs: parts_ax.plot(epochs[column], 'o-', label=column)
    parts_ax.set(xlabel='epoch', title='Distilled student: distillation terms' if len(epochs) else
                 'No distilled student')
    if len(epochs): parts_ax.legend()
    fig.tight_layout()
    return fig


def _distillation_title(learners: dict, chosen: dict | None) -> str:
    """What the distilled student trained with, read from its callbacks: the loss, the hints, the mixing and the
    weight, and which candidate of kd_find it was; or that the students trained alone"""
    if 'distilled student' not in learners: return 'the student alone (kd_find: no method paid)'
    learn = learners['distilled student']
    kd = next(cb for cb in learn.cbs if isinstance(cb, KnowledgeDistillation))
    mixes = [type(cb).__name__ for cb in learn.cbs if isinstance(cb, (MixUp, CutMix))]
    hints = ''.join(f' + {type(h.loss).__name__} hint {h.student_layer} -> {h.teacher_layer}'
                    for h in (kd.hints.hints if kd.hints else ()))
    picked = f' (kd_find\'s pick: {chosen["name"]})' if chosen else ''
    return f'{kd.kd_loss}{hints}{"".join(f" on {m} batches" for m in mixes)}, weight {kd.weight}{picked}'


def _kd_find_lines(chosen: dict) -> list[str]:
    "kd_find's section of the report: what it chose and why, its cost, its table and plot (kd_find.png)"
    res = chosen['result']
    trained = (f'The students were distilled with **{chosen["name"]}**.' if chosen['paid'] else
               f'The students trained alone: no candidate paid (the best, {chosen["name"]}, showed no gain over '
               'the student alone, as the verdict above says; distilling with it anyway would spend the teacher\'s '
               'forwards on a method the validation split gave no reason to trust).')
    return ['## kd_find: how to distil, measured on the validation split', '', f'**{chosen["message"]}**', '',
            trained, '', f'Cost: {len(res.trials)} trials, {res.seconds:.0f} s, {res.runs:.1f} runs of the student '
            f'alone at the planned schedule (in seconds); learning rate {res.lr:.3g}. Gain: {_gain_is(res)}, same '
            'rung and seeds; agreement: the share of '
            'validation items where student and teacher predict the same class.', '', _markdown(res.table), '',
            '![kd_find: gain over the student alone per candidate](kd_find.png)', '']


def _gain_is(res) -> str:
    "What a gain in kd_find's table is, in words: a rise of the metric, or a fall for a lower-is-better one"
    if res.lower_is_better:
        return f"the student alone's validation {res.metric} minus the candidate's (lower is better: a fall is a gain)"
    return f"the candidate's validation {res.metric} minus the student alone's"


def _settings_lines(settings: dict, env: dict) -> list[str]:
    "How the report was made: the command, the versions and the machine, then every setting"
    made_by = f'`{settings["command"]}`' if 'command' in settings else '`distillation_job(...)`'
    versions = ', '.join(f'{k} {env[k]}' for k in ('fastkd', 'fastai', 'torch', 'python'))
    return [f'Made by {made_by} with {versions}, on {env["cpu"]}, {env["threads"]} torch threads, GPU: {env["gpu"]}.',
            '', '| setting | value |', '|---|---|', *(f'| {k} | {v} |' for k, v in settings.items() if k != 'command')]


def write_report(job: dict, dest: str | Path, title: str = 'fastkd distillation report') -> Path:
    """Write `dest/report.md` (how it was made, scores per model over the seeds, the verdict, every run, compression),
    `results.csv` (a row per model and seed, with the command, the versions and every setting as columns),
    `losses.png`, `tta.png` and the distilled student's weights `student.pth` (a state dict: `load_teacher` and
    `load_state_dict` read it back) with `student.json` beside it (the architecture, image size and classes it was
    trained for, which `fastkd evaluate` reads); plots and weights are those of the first seed. A job that ran
    kd_find (`--method auto`) adds its section and `kd_find.png`; where no method paid, the student alone takes the
    distilled student's place in `tta.png` and `student.pth`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    table, learners, settings, env = job['table'], job['learners'], job.get('settings', {}), environment()
    about = {f'job_{k}' if k in table.columns else k: ' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v
             for k, v in {**settings, **env}.items()}  # job_seed, job_epochs: the job's, beside each run's own
    atomic_write(dest/'results.csv', lambda tmp: table.assign(**about).to_csv(tmp))
    atomic_write(dest/'losses.png', lambda tmp: _loss_figure(job['training']).savefig(tmp, format='png', dpi=100))
    main, chosen = 'distilled student' if 'distilled student' in learners else 'student', job.get('kd_find')
    atomic_write(dest/'tta.png', lambda tmp: plot_tta(job['tta'][main]).savefig(tmp, format='png', dpi=100))
    atomic_write(dest/'student.pth', lambda tmp: torch.save(learners[main].model.state_dict(), tmp))
    if chosen: atomic_write(dest/'kd_find.png', lambda tmp: chosen['figure'].savefig(tmp, format='png', dpi=100))
    trained_for = {key: settings[name] for key, name in (('arch', 'student'), ('size', 'size'), ('classes', 'classes'))
                   if settings.get(name) is not None}
    atomic_write(dest/'student.json', lambda tmp: Path(tmp).write_text(json.dumps(trained_for)))
    tta_column = table.columns[table.columns.str.startswith('test_f1_tta')][0]
    teacher_accuracy = table.loc[['teacher'], 'valid_accuracy'].iloc[0]
    text = '\n'.join([
        f'# {title}: {_distillation_title(learners, chosen)}', '', *_settings_lines(settings, env), '',
        f'**{job["verdict"]}**', '', f'- {VERDICT_RULE}',
        f'- test_f1: weighted F1 on the test set without TTA; {tta_column}: with that many augmented passes. Mean and '
        'sample standard deviation (std) over the seeds; the teacher is trained or loaded once '
        f'(its validation accuracy: {teacher_accuracy:.4f}).',
        f'- {compression_summary(job["sizes"])}',
        *([f'- The data was split with split seed {settings["split_seed"]} (--split-seed), apart from the seeds of the '
           'models.'] if 'split_seed' in settings else []),
        *([f'- The distilled students also learned from unlabeled images ({settings["unlabeled_items"]}), taught by '
           'the teacher alone; the teacher and the students alone trained on the labeled images'
           + (f' ({settings["labels"]:.0%} of the training labels, --labels).' if settings.get('labels', 1) < 1 else
              '.')] if settings.get('unlabeled_items') else []),
        *([f'- The teacher received the students\' images as it takes them, {settings["teacher_input"]}: the students '
           f'trained at {settings.get("size")} px.'] if settings.get('teacher_input') else []), '',
        *(_kd_find_lines(chosen) if chosen else []),
        '## Per model', '', _markdown(job['summary']), '',
        '## Every run', '', _markdown(table), '',
        f'Plots and `student.pth` (the {main}\'s weights) are from seed {job["seeds"][0]}.', '',
        '![training losses](losses.png)', '', f'![TTA sweep of the {main}](tta.png)', ''])
    atomic_write(dest/'report.md', lambda tmp: Path(tmp).write_text(text, encoding='utf-8'))
    return dest/'report.md'


def _markdown(table: pd.DataFrame) -> str:
    "`table` as a Markdown table, numbers to 4 significant digits, missing ones as '-'"
    cells = [[str(index)] + [('-' if pd.isna(v) else f'{v:.4g}') if isinstance(v, float) else str(v) for v in row]
             for index, row in zip(table.index, table.itertuples(index=False))]
    header = [table.index.name or ''] + list(table.columns)
    return '\n'.join('| ' + ' | '.join(line) + ' |' for line in [header, ['---'] * len(header), *cells])
