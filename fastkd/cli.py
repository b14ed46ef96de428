"""The `fastkd` command: `demo` (the whole job on the embedded digits), `gtsrb` (the same on GTSRB),
`prepare`, `evaluate` and `fill-cache` (single steps). Bad arguments exit with code 2 and say what to fix."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from functools import partial
from pathlib import Path

import torch
import torchvision.models
from fastai.vision.models.xresnet import xresnet18, xresnet34
from fastprogress.fastprogress import progress_bar

from .basics import few
from .kd_find import kd_find_for_job
from .report import write_report
from .teacher_input import AdaptedTeacher, TeacherInput, input_stats
from .workflow import (KD_METHODS, MIXES, InputSizeError, Schedule, check_on_validation, distillation_job, kd_method,
                       scratch_learner, weighted_f1)

__all__ = ['main', 'ARCHS']

AUTO = 'auto'  # --method auto: kd_find chooses
BY_HAND = ('temperature', 'standardize', 'mix', 'mix_alpha', 'weight')  # what --method auto leaves to kd_find
DEFAULT_WEIGHT = 0.5
DEFAULT_SIZE = 96  # the reference notebook's, for the official full-size images
DEFAULT_TEACHER = 'resnet34'  # of fastkd gtsrb and fill-cache, when the teacher weights do not say
SIDECAR = '.json'  # beside weights fastkd writes (student.pth, student.json): what they were trained for
USER_ERRORS = (OSError, ValueError)  # missing or clashing files, downloads, unreadable images, bad values

ARCHS = {**{name: getattr(torchvision.models, name) for name in ('resnet18', 'resnet34', 'resnet50', 'resnet101')},
         'xresnet34-half': partial(xresnet34, widen=0.5),  # fastai's XResNet-34 at half width: 5.6M parameters
         'xresnet18-quarter': partial(xresnet18, widen=0.25),  # XResNet-18 at a quarter width: 0.87M parameters
         'xresnet18-sixteenth': partial(xresnet18, widen=1/16)}  # at a sixteenth: 0.11M parameters


def _schedule_args(parser: argparse.ArgumentParser, size: int, epochs: int, bs: int, lr_find_iters: int,
                   teacher: str, student: str, seeds: int, teacher_epochs: int | None = None, lr: float | None = None,
                   method: str = 'softtarget'):
    "Options shared by the commands that train: sizes, schedule, distillation settings, TTA sweep, report folder"
    parser.add_argument('--size', type=int, default=size, help='image size in pixels (default: ' + (
        f'{size})' if size else f"the size in the teacher weights' {SIDECAR} file, else {DEFAULT_SIZE})"))
    parser.add_argument('--bs', type=int, default=bs, help='batch size (default: %(default)s)')
    parser.add_argument('--freeze-epochs', type=int, default=1,
                        help='epochs with the body frozen, after lr_find (default: %(default)s)')
    parser.add_argument('--epochs', type=int, default=epochs, help='epochs after unfreezing (default: %(default)s)')
    parser.add_argument('--teacher-epochs', type=int, default=teacher_epochs,
                        help='epochs after unfreezing of the teacher, trained once (default: '
                        f'{teacher_epochs or "--epochs"})')
    parser.add_argument('--lr', type=float, default=lr,
                        help='learning rate; 0 finds one with lr_find for the teacher and for each seed (default: '
                        f'{lr or "0"})')
    parser.add_argument('--lr-find-iters', type=int, default=lr_find_iters,
                        help='steps of lr_find when --lr is 0 (default: %(default)s)')
    parser.add_argument('--teacher', choices=ARCHS, default=teacher, help='teacher architecture (default: ' + (
        f'{teacher})' if teacher else f"the one in the teacher weights' {SIDECAR} file, else {DEFAULT_TEACHER})"))
    parser.add_argument('--student', choices=ARCHS, default=student, help='student architecture (default: %(default)s)')
    parser.add_argument('--method', choices=[*KD_METHODS, AUTO], default=method,
                        help='distillation loss: ' + '; '.join(f'{name}: {entry.about}' for name, entry in
                                                               KD_METHODS.items())
                        + f'; {AUTO}: kd_find tries each way of distilling on the validation split first (short '
                        'trainings on one seed, then at least two finalists at the planned schedule on other seeds, '
                        'more while the verdict is open; starting weights drawn from each seed), then the seeds train '
                        'with its pick, or alone when none paid; the student alone always trains without mixing '
                        '(default: %(default)s)')
    parser.add_argument('--temperature', type=float, default=None,
                        help="temperature T of the loss (default: the loss's own: 4 for softtarget, dkd and fm, "
                        '1 for dist)')
    parser.add_argument('--standardize', action='store_true',
                        help='z-score both logits per row first (logit standardization; softtarget, dkd, fm)')
    parser.add_argument('--mix', choices=MIXES, default=None, help='augmentation of --method fm (default: mixup)')
    parser.add_argument('--mix-alpha', type=float, default=None,
                        help="Beta parameter of --mix (default: fastai's, 0.4 for mixup and 1 for cutmix)")
    parser.add_argument('--weight', type=float, default=None,
                        help=f'weight of the distillation loss, between 0 and 1 (default: {DEFAULT_WEIGHT})')
    parser.add_argument('--n-augs', type=int, nargs='+', default=[4, 8],
                        help='numbers of augmented TTA passes to score, besides plain predictions (default: 4 8)')
    parser.add_argument('--seed', type=int, default=42,
                        help='random seed of every model; the data split has its own, --split-seed (default: '
                        '%(default)s)')
    parser.add_argument('--seeds', type=int, default=seeds,
                        help='students trained alone and distilled from seeds SEED, SEED+1, ...; the report gives '
                        'mean and spread and says whether the 95%% confidence interval of the mean gain lies above '
                        'zero (default: %(default)s)')
    _split_seed_arg(parser)
    _threads_arg(parser)
    parser.add_argument('--out', type=Path, default=Path('fastkd-report'),
                        help='report folder (default: %(default)s)')


def _unlabeled_args(parser: argparse.ArgumentParser):
    "Options that add images without labels to the distilled students' training"
    parser.add_argument('--unlabeled', type=Path, default=None,
                        help='a folder of images without labels (any layout, only read): the distilled students also '
                        'learn from them, taught by the teacher alone')
    parser.add_argument('--labels', type=float, default=1.,
                        help='share of the training labels kept, drawn within each class with --split-seed; the other '
                        'training images join as unlabeled ones, to measure what they gain (default: 1, all)')


def _split_seed_arg(parser: argparse.ArgumentParser):
    parser.add_argument('--split-seed', type=int, default=42,
                        help='random seed of the validation split, apart from the seeds of the models; kept in the '
                        'prepared folder, which refuses another (default: %(default)s)')


def _threads_arg(parser: argparse.ArgumentParser):
    parser.add_argument('--threads', type=int, default=None,
                        help="CPU threads of torch (default: torch's choice); 1 is fastest on a busy machine")


def _data_args(parser: argparse.ArgumentParser, required: bool = True):
    "Options that say where GTSRB is and which classes matter"
    parser.add_argument('--data', type=Path, required=required,
                        help='GTSRB folder: the official zips, their unpacked GTSRB/ folder, or prepare\'s output')
    parser.add_argument('--classes', type=int, nargs='+', default=None,
                        help='ClassIds of interest (default: all 43): training uses them, scores are over them')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='fastkd', description='Knowledge distillation for fastai: train a teacher, '
                                     'distil it into a smaller student, and report whether it paid.')
    parser.add_argument('--debug', action='store_true',
                        help='show the full traceback of an error, not only its one-line message')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    demo = commands.add_parser('demo', help='the whole job on scikit-learn\'s digits (no download)',
                               description='Teacher, student alone, distilled student and their TTA scores on '
                               'scikit-learn\'s digits written as an image folder; writes a report folder.')
    _schedule_args(demo, size=16, epochs=3, bs=64, lr_find_iters=100, teacher='xresnet34-half',
                   student='xresnet18-sixteenth', seeds=8, teacher_epochs=12, lr=1e-2)
    demo.add_argument('--data', type=Path, default=None,
                      help='where to write the digits image folder (default: OUT/digits)')
    _unlabeled_args(demo)
    gtsrb = commands.add_parser('gtsrb', help='the whole job on GTSRB (ResNet-34 teacher, ResNet-18 student)',
                                description='The reference workflow on GTSRB, from official zips or folders.')
    _data_args(gtsrb)
    gtsrb.add_argument('--download', action='store_true', help='download the official zips into --data first')
    gtsrb.add_argument('--teacher-weights', type=Path, default=None,
                       help='state dict of a trained teacher (skips training the teacher)')
    gtsrb.add_argument('--teacher-size', type=int, default=None,
                       help="the image size the teacher of --teacher-weights takes, when not --size: it receives the "
                       "students' images resized to it (default: --size, or the size at which the check before "
                       'training finds it works)')
    gtsrb.add_argument('--validation-fraction', type=float, default=0.2, help='share of tracks held out (default: 0.2)')
    _schedule_args(gtsrb, size=None, epochs=4, bs=64, lr_find_iters=100, teacher=None, student='resnet18',
                   seeds=1,
                   method='dist')  # DIST paid on GTSRB 32x32 (bench/accuracy.py); SoftTarget T=4 slowed small students
    _unlabeled_args(gtsrb)
    prepare = commands.add_parser('prepare', help='GTSRB zips or folders to train/valid/all/test folders',
                                  description='Make train/, valid/, all/ and test/ folders (one sub-folder per '
                                  'ClassId) in --data from the official zips or their unpacked GTSRB/ folder.')
    _data_args(prepare)
    prepare.add_argument('--download', action='store_true', help='download the official zips into --data first')
    prepare.add_argument('--validation-fraction', type=float, default=0.2,
                         help='share of tracks held out (default: 0.2)')
    prepare.add_argument('--link', action='store_true',
                         help='hard-link instead of copying where the file system allows')
    _split_seed_arg(prepare)
    evaluate = commands.add_parser('evaluate', help='TTA sweep, per-class table and confusion matrix of saved weights',
                                   description='Score a model\'s saved state dict on the prepared GTSRB test set.')
    _data_args(evaluate)
    evaluate.add_argument('--weights', type=Path, required=True, help='state dict file of the model to score')
    evaluate.add_argument('--arch', choices=ARCHS, default=None,
                          help=f"its architecture (default: the one in the weights' {SIDECAR} file, else resnet18)")
    evaluate.add_argument('--size', type=int, default=None,
                          help=f"image size in pixels (default: the one in the weights' {SIDECAR} file, else "
                          f'{DEFAULT_SIZE})')
    evaluate.add_argument('--bs', type=int, default=64, help='batch size (default: %(default)s)')
    evaluate.add_argument('--n-augs', type=int, nargs='+', default=[0, 5, 10],
                          help='numbers of augmented passes (default: 0 5 10)')
    evaluate.add_argument('--out', type=Path, default=Path('fastkd-eval'), help='output folder (default: %(default)s)')
    _threads_arg(evaluate)
    fill = commands.add_parser('fill-cache', help="the teacher's outputs for the GTSRB training images, stored once",
                               description="Run a trained teacher once over the training images of --data (no "
                               'augmentation) and store its outputs in --cache, where KnowledgeDistillation(teacher, '
                               'cache=CACHE) on gtsrb_dls(DATA, size=SIZE, augment=False) reuses them.')
    _data_args(fill)
    fill.add_argument('--teacher-weights', type=Path, required=True, help='state dict of the trained teacher')
    fill.add_argument('--teacher', choices=ARCHS, default=None,
                      help=f"its architecture (default: the one in the weights' {SIDECAR} file, else "
                      f'{DEFAULT_TEACHER})')
    fill.add_argument('--size', type=int, default=None,
                      help=f"image size in pixels (default: the one in the weights' {SIDECAR} file, else "
                      f'{DEFAULT_SIZE})')
    fill.add_argument('--teacher-size', type=int, default=None,
                      help="the image size the teacher takes, when not --size: it runs on the images resized to it, "
                      'as KnowledgeDistillation(teacher, teacher_input=TeacherInput(SIZE)) runs it (default: --size)')
    fill.add_argument('--bs', type=int, default=256, help='batch size (default: %(default)s)')
    fill.add_argument('--cache', type=Path, required=True,
                      help='folder of teacher stores (created if missing; one sub-folder per teacher and data)')
    fill.add_argument('--dtype', choices=('float32', 'float16'), default='float32',
                      help='storage of the outputs (default: %(default)s)')
    fill.add_argument('--top-k', type=int, default=None,
                      help='store only the K largest logits and the rest of the probability mass (default: all)')
    fill.add_argument('--validation-fraction', type=float, default=0.2,
                      help='share of tracks held out when --data is not prepared yet (default: 0.2)')
    fill.set_defaults(download=False)
    _split_seed_arg(fill)
    _threads_arg(fill)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace):
    "Refuse values argparse lets through, naming the fix"
    if getattr(args, 'method', None) == AUTO:
        given = [f'--{name.replace("_", "-")}' for name in BY_HAND if getattr(args, name) not in (None, False)]
        if given:
            parser.error(f'{", ".join(given)} set the method by hand, which --method auto leaves to kd_find (each of '
                         'its candidates has its own loss, temperature, weight and mixing): drop them, or name a '
                         '--method')
    elif hasattr(args, 'weight') and args.weight is None: args.weight = DEFAULT_WEIGHT
    if getattr(args, 'weight', None) is not None and not 0 <= args.weight <= 1:
        parser.error('--weight must be between 0 and 1')
    for name in ('size', 'bs', 'epochs', 'teacher_epochs', 'lr_find_iters', 'threads', 'seeds', 'top_k',
                 'teacher_size'):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if getattr(args, 'freeze_epochs', 0) < 0: parser.error('--freeze-epochs must be 0 or more')
    if getattr(args, 'split_seed', 0) < 0: parser.error('--split-seed must be 0 or more')
    if (getattr(args, 'lr', None) or 0) < 0: parser.error('--lr must be above 0 (or 0 to find it with lr_find)')
    for name in ('temperature', 'mix_alpha'):
        if getattr(args, name, None) is not None and getattr(args, name) <= 0:
            parser.error(f'--{name.replace("_", "-")} must be above 0')
    if getattr(args, 'standardize', False) and args.method == 'dist':
        parser.error('--standardize works with --method softtarget, dkd or fm (DIST compares correlations, which '
                     'z-scoring leaves unchanged)')
    if (getattr(args, 'mix', None) or getattr(args, 'mix_alpha', None)) and args.method != 'fm':
        parser.error('--mix and --mix-alpha set the augmentation of function matching: add --method fm')
    if any(n < 0 for n in getattr(args, 'n_augs', [])): parser.error('--n-augs must be 0 or more')
    if getattr(args, 'teacher_size', None) and not args.teacher_weights:
        parser.error('--teacher-size is the size the teacher of --teacher-weights takes: add --teacher-weights (a '
                     'teacher the job trains takes the students\' images)')
    if hasattr(args, 'labels') and not 0 < args.labels <= 1: parser.error('--labels must be above 0 and at most 1')
    if getattr(args, 'unlabeled', None) is not None and not args.unlabeled.is_dir():
        parser.error(f'--unlabeled {args.unlabeled}: ' + ('a file, not a folder of images' if args.unlabeled.is_file()
                                                          else 'no such folder'))
    unlabeled = getattr(args, 'unlabeled', None) or getattr(args, 'labels', 1) < 1
    if unlabeled and args.method == 'fm' and args.weight != 1:
        parser.error('--method fm mixes each image with another, and with unlabeled images the mixed label could be '
                     'unknown: add --weight 1 (function matching: the teacher alone teaches)')
    if hasattr(args, 'validation_fraction') and not 0 < args.validation_fraction < 1:
        parser.error('--validation-fraction must be between 0 and 1')
    if getattr(args, 'classes', None) and not all(0 <= c < 43 for c in args.classes):
        parser.error('--classes are GTSRB ClassIds, from 0 to 42')
    for name in ('teacher_weights', 'weights'):
        file = getattr(args, name, None)
        if file is not None and not file.is_file(): parser.error(f'--{name.replace("_", "-")} {file}: no such file')
    data = getattr(args, 'data', None)
    if args.command != 'demo' and not getattr(args, 'download', False) and not (data and data.is_dir()):
        parser.error(f'--data {data}: no such folder. Put the official GTSRB zips (or their unpacked GTSRB/ folder) '
                     'there, or add --download to fetch them (fastkd prepare --data DIR --download).')


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastkd` console script. An error in the data or the files (a `USER_ERRORS`) is printed as one
    line `fastkd: <message>` and returns 1; `fastkd --debug COMMAND` raises it with its traceback."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(['fastkd', *argv])
    _check(parser, args)
    for name in ('data', 'unlabeled'):  # the same data from any folder: the same job
        if getattr(args, name, None): setattr(args, name, getattr(args, name).resolve())
    if getattr(args, 'threads', None): torch.set_num_threads(args.threads)
    commands = {'demo': _demo, 'gtsrb': _gtsrb, 'prepare': _prepare, 'evaluate': _evaluate, 'fill-cache': _fill_cache}
    try: return commands[args.command](args) or 0
    except USER_ERRORS as error:  # missing or bad files, bad values: their message names the fix
        if args.debug: raise
        print(f'fastkd: {str(error) or type(error).__name__}'.replace('\n', ' '), file=sys.stderr)
        return 1


def _schedule(args):
    return Schedule(args.freeze_epochs, args.epochs, args.lr or None, args.lr_find_iters, args.seed)


def _settings(args) -> dict:
    "The command line and every option of `args`, as the report and the job's run store record them"
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
               if k not in ('command', 'command_line', 'debug')}
    return {'command': args.command_line, **options}


def _with_unlabeled(args, dls, test_dl):
    """`dls` with the share --labels of its training labels, and the unlabeled items: the images of --unlabeled (each
    readable, none of them a validation or test image, the labeled training images left out) and the training images
    whose labels --labels left out (None when there are none)"""
    from fastai.data.transforms import get_image_files

    from .gtsrb import image_problem
    from .unlabeled import keep_labels
    unlabeled, parts = [], []
    if args.unlabeled is not None:
        found = sorted(f.resolve() for f in get_image_files(args.unlabeled))
        if not found: raise FileNotFoundError(f'--unlabeled {args.unlabeled} holds no images: pass a folder of images.')
        held_out = {Path(f).resolve() for f in [*dls.valid.items, *test_dl.items]} & set(found)
        if held_out:
            raise ValueError(f'--unlabeled {args.unlabeled} holds {len(held_out)} validation or test images (e.g. '
                             f'{min(held_out)}): they would score students that trained on them. Pass a folder of '
                             'other images.')
        if problems := [p for p in map(image_problem, progress_bar(found, leave=False)) if p]:
            raise ValueError(f'--unlabeled {args.unlabeled} holds {len(problems)} unreadable images: {few(problems)}. '
                             'Remove them, or pass another folder.')
        labeled = {Path(f).resolve() for f in dls.train.items}
        unlabeled = [f for f in found if f not in labeled]
        left_out = f' ({len(found) - len(unlabeled)} labeled training images left out)' * (len(unlabeled) < len(found))
        parts = [f'{len(unlabeled)} from {args.unlabeled}{left_out}']
    if args.labels < 1:
        dls, held = keep_labels(dls, args.labels, seed=args.split_seed)
        unlabeled, parts = unlabeled + held, parts + [f'{len(held)} training images without their labels (--labels '
                                                      f'{args.labels:g})']
    if not unlabeled: return dls, None
    print(f'Distilled students also learn from {len(unlabeled)} unlabeled images, {" and ".join(parts)}; the teacher '
          f'and the students alone train on {len(dls.train_ds)} labeled images.')
    return dls, unlabeled


def _job(args, dls, test_dl, y_true, teacher=None, mask=None, title: str = '', teacher_input=None):
    """Run the distillation job with the command-line settings, keeping each run in --out as it ends; write its report.
    With --method auto, kd_find chooses the distillation on the validation split once the teacher is ready."""
    dls, unlabeled = _with_unlabeled(args, dls, test_dl)
    if args.method == AUTO:
        method = dict(choose=partial(kd_find_for_job, dls, ARCHS[args.student], schedule=_schedule(args)))
    else:
        loss_kwargs = {**({'T': args.temperature} if args.temperature else {}),
                       **({'standardize': True} if args.standardize else {})}
        kd_loss, mix = kd_method(args.method, args.mix or 'mixup', args.mix_alpha, **loss_kwargs)
        method = dict(kd_loss=kd_loss, kd_weight=args.weight, mix=mix)
    try:
        job = distillation_job(dls, test_dl, y_true, ARCHS[args.teacher], ARCHS[args.student], _schedule(args),
                               teacher=teacher, n_augs=args.n_augs, mask=mask,
                               seeds=range(args.seed, args.seed + args.seeds), teacher_epochs=args.teacher_epochs,
                               runs=args.out/'runs', settings=_settings(args), unlabeled=unlabeled,
                               teacher_input=teacher_input, **method)
    except FileExistsError as error: sys.exit(f'fastkd: {error}')
    if job['reused']: print(f'Reused the runs kept in {args.out/"runs"}: {", ".join(job["reused"])}.')
    if job['kd_find']: print(f'kd_find: {job["kd_find"]["message"]}')
    report = write_report(job, args.out, title)
    if teacher is None: _save_teacher(job['learners']['teacher'].model, args)
    print(job['table'].to_string(float_format='{:.4g}'.format))
    print(job['verdict'])
    print(f'Report written to {report}')


def _save_teacher(model, args):
    "The teacher the job trained as OUT/teacher.pth with its sidecar, ready for --teacher-weights"
    from .files import atomic_write
    atomic_write(args.out/'teacher.pth', lambda tmp: torch.save(model.state_dict(), tmp))
    classes = getattr(args, 'classes', None)
    trained_for = dict(arch=args.teacher, size=args.size, **({'classes': classes} if classes else {}))
    atomic_write(args.out/f'teacher{SIDECAR}', lambda tmp: Path(tmp).write_text(json.dumps(trained_for)))


def _trained_for(weights: Path | None) -> dict:
    """What `weights` were trained for (`arch`, `size`, `classes`), from the file fastkd writes beside them (such as
    student.json beside student.pth), if any; an error when that file holds something else"""
    sidecar = weights.with_suffix(SIDECAR) if weights else None
    if sidecar is None or sidecar == weights or not sidecar.is_file(): return {}
    try: kept = json.loads(sidecar.read_text())
    except ValueError as e: kept = f'no JSON ({e})'
    classes = kept.get('classes') or [] if isinstance(kept, dict) else None
    if not (isinstance(classes, list) and all(c in range(43) for c in classes) and
            kept.get('arch') in (None, *ARCHS) and isinstance(kept.get('size', 1), int)):
        raise ValueError(f'{sidecar}, beside {weights}, is not what fastkd writes there (the architecture, size and '
                         f'classes they were trained for): it holds {str(kept)[:200]}. Fix or delete it, and pass '
                         '--size and --classes by hand.')
    return {k: kept[k] for k in ('arch', 'size', 'classes') if kept.get(k)}


def _take_trained_for(args, weights: Path, arch: str, default_arch: str):
    """Fill the options `arch` (`teacher` or `arch`), `size` and `classes` not given from what `weights` were trained
    for; refuse another architecture, or classes the weights never learned"""
    trained_for, given = _trained_for(weights), getattr(args, arch)
    kept, option = trained_for.get('arch'), f'--{arch}'
    if given and kept and given != kept:
        raise ValueError(f'{weights} holds a {kept} ({weights.with_suffix(SIDECAR)}), not a {given}: drop {option} '
                         f'{given} or pass {option} {kept}.')
    learned = trained_for.get('classes')
    unknown = sorted(set(args.classes or []) - set(learned or args.classes or []))
    if unknown:
        raise ValueError(f'{weights} learned classes {learned} only ({weights.with_suffix(SIDECAR)}), not {unknown} '
                         f'of --classes {" ".join(map(str, args.classes))}: pass --classes among '
                         f'{" ".join(map(str, learned))} (or none, for all of them), or weights trained on these.')
    setattr(args, arch, given or kept or default_arch)
    args.size, args.classes = args.size or trained_for.get('size') or DEFAULT_SIZE, args.classes or learned


def _checked(model, dls, args, name: str, size: int) -> int:
    """Stop before anything trains or is written when `model` is no better than chance on validation images at any
    size; the size at which it works: `size`, or the nearest other one the check finds"""
    from .gtsrb import gtsrb_dls
    def resized(other_size: int): return gtsrb_dls(args.data, size=other_size, bs=args.bs, classes=args.classes)
    try: check_on_validation(model, dls, name, size=size, resized=resized)
    except InputSizeError as error: return error.size
    except ValueError as error: sys.exit(f'fastkd: {error} Nothing was trained or written.')
    return size


def _teacher_input(teacher, dls, args) -> TeacherInput | None:
    """What the teacher of --teacher-weights receives: the students' images (None), or resized to --teacher-size, else
    to the size at which the check finds it works (one line says so); a teacher that works at no size stops the job"""
    name = f'the teacher ({args.teacher} from {args.teacher_weights})'
    if args.teacher_size in (None, args.size):
        size = _checked(teacher, dls, args, name, args.size)
        if size == args.size: return None
    else:
        size = args.teacher_size
        _checked(AdaptedTeacher(teacher, TeacherInput(size), input_stats(dls.train)), dls, args, f'{name} at {size} px',
                 args.size)
    print(f'{name.capitalize()} works at {size} px: it receives the students\' images resized to {size} px, and the '
          f'students train at --size {args.size}.')
    return TeacherInput(size)


def _demo(args):
    from .digits import digits_dls, write_digits
    # 30% of the 1,797 digits to test (539 images), 10% to validate: at 359 test images one seed's score moved by about
    # a point from which images it happened to miss, as much as the gain the demo measures
    try: data = write_digits(args.data or (args.out/'digits').resolve(), size=args.size, valid_fraction=0.1,
                             test_fraction=0.3, seed=args.split_seed)
    except FileExistsError as error: sys.exit(f'fastkd: {error}')
    dls = digits_dls(data, size=args.size, bs=args.bs, seed=args.split_seed)
    test_files = sorted((data/'test').glob('*/*.png'))
    y_true = [dls.vocab.o2i[f.parent.name] for f in test_files]
    _job(args, dls, dls.test_dl(test_files), y_true, title='fastkd demo: distillation on scikit-learn digits')


def _prepared(args) -> dict:
    "prepare_gtsrb on --data, after downloading the official zips when asked"
    from .gtsrb import download_gtsrb, prepare_gtsrb
    if args.download: download_gtsrb(args.data)
    return prepare_gtsrb(args.data, classes=args.classes, validation_fraction=args.validation_fraction,
                         link=getattr(args, 'link', False), seed=args.split_seed)


def _gtsrb_test(args, dls):
    "The labelled GTSRB test set of --data and the mask of the classes of interest, or an exit when it is missing"
    from .gtsrb import gtsrb_test_dl
    from .tta import class_mask
    if not (args.data/'test').is_dir():
        sys.exit(f'fastkd: no test set in {args.data}: add GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip '
                 '(or --download) and run again.')
    test_dl, y_true = gtsrb_test_dl(dls, args.data, classes=args.classes)
    return test_dl, y_true, (class_mask(y_true, args.classes) if args.classes else None)


def _gtsrb(args):
    from .callback import load_teacher
    from .gtsrb import gtsrb_dls
    _take_trained_for(args, args.teacher_weights, 'teacher', DEFAULT_TEACHER)
    teacher = load_teacher(args.teacher_weights, ARCHS[args.teacher], 43) if args.teacher_weights else None
    _prepared(args)
    dls = gtsrb_dls(args.data, size=args.size, bs=args.bs, classes=args.classes)
    teacher_input = _teacher_input(teacher, dls, args) if teacher is not None else None
    test_dl, y_true, mask = _gtsrb_test(args, dls)
    _job(args, dls, test_dl, y_true, teacher=teacher, mask=mask, title='fastkd: distillation on GTSRB',
         teacher_input=teacher_input)


def _prepare(args):
    paths = _prepared(args)
    for name, path in paths.items(): print(f'{name:>5}: {path}')


def _evaluate(args):
    from .callback import load_teacher
    from .files import atomic_write
    from .gtsrb import gtsrb_class_names, gtsrb_dls
    from .report import per_class_table, plot_confusion
    from .tta import plot_tta, test_time_aug
    _take_trained_for(args, args.weights, 'arch', 'resnet18')
    dls = gtsrb_dls(args.data, size=args.size, bs=args.bs, classes=args.classes)
    learn = scratch_learner(dls, ARCHS[args.arch])
    load_teacher(args.weights, learn.model)
    size = _checked(learn.model, dls, args, f'the model in {args.weights} ({args.arch})', args.size)
    if size != args.size:  # scored on the images at the size it works at
        print(f'The model in {args.weights} works at {size} px, not at --size {args.size}: it is scored at {size} px.')
        args.size, dls = size, gtsrb_dls(args.data, size=size, bs=args.bs, classes=args.classes)
        learn.dls = dls
    test_dl, y_true, mask = _gtsrb_test(args, dls)
    results = test_time_aug(learn, test_dl, y_true, weighted_f1, args.n_augs, mask=mask)
    y_pred = learn.get_preds(dl=test_dl)[0].argmax(dim=1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out/'tta.csv', partial(results.to_csv, index=False))
    atomic_write(args.out/'tta.png', partial(plot_tta(results).savefig, format='png'))
    table = per_class_table(y_true, y_pred, dls.vocab, gtsrb_class_names(), mask)
    atomic_write(args.out/'per_class.csv', table.to_csv)
    confusion = plot_confusion(y_true, y_pred, dls.vocab, mask)
    atomic_write(args.out/'confusion.png', partial(confusion.savefig, format='png'))
    print(f'{args.weights} ({args.arch}, {args.size} px) on the test set, weighted F1 by augmented passes:')
    print(results.to_string(index=False, float_format='{:.4f}'.format))
    print(f'Results written to {args.out}')



def _fill_cache(args):
    from .cache import fill_teacher_cache
    from .callback import load_teacher
    from .gtsrb import gtsrb_dls
    _take_trained_for(args, args.teacher_weights, 'teacher', DEFAULT_TEACHER)
    teacher = load_teacher(args.teacher_weights, ARCHS[args.teacher], 43)
    _prepared(args)
    dls = gtsrb_dls(args.data, size=args.size, bs=args.bs, classes=args.classes, augment=False)
    teacher_input = TeacherInput(args.teacher_size) if args.teacher_size not in (None, args.size) else None
    folder = fill_teacher_cache(teacher, dls, args.cache, dtype=getattr(torch, args.dtype), top_k=args.top_k,
                                teacher_input=teacher_input)
    classes = f', classes={args.classes}' if args.classes else ''
    given = f', teacher_input={teacher_input}' if teacher_input else ''
    print(f'Teacher outputs for the {len(dls.train.dataset)} training images stored in {folder}. Reuse them with '
          f'KnowledgeDistillation(teacher, cache=TeacherCache(path={str(args.cache)!r}, dtype=torch.{args.dtype}, '
          f'top_k={args.top_k}){given}) on gtsrb_dls({str(args.data)!r}, size={args.size}, augment=False{classes}).')

if __name__ == '__main__': sys.exit(main())
