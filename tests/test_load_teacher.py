"load_teacher: an architecture plus a state dict file, loaded with weights_only=True, frozen."
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from fastai.learner import Learner
from fastai.vision.learner import create_vision_model
from torchvision.models import resnet18

from conftest import tiny_cnn
from fastkd.callback import load_teacher
from fastkd.digits import digits_dls


def test_loads_a_state_dict_into_a_vision_model_frozen(tmp_path):
    trained = create_vision_model(resnet18, 43, pretrained=False)
    torch.save(trained.state_dict(), tmp_path/'resnet18_weights.pth')
    teacher = load_teacher(tmp_path/'resnet18_weights.pth', resnet18, 43)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), trained.state_dict().values()))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize('fit', ['fit', 'fit_one_cycle'])
def test_loads_the_model_part_of_learn_save(digits_path, tmp_path, fit):
    learn = Learner(digits_dls(digits_path, size=32, bs=64), tiny_cnn(8), path=tmp_path)
    getattr(learn, fit)(1, 1e-2)  # fit_one_cycle leaves numpy scalars in the optimizer's hyper-parameters
    learn.save('teacher')  # weights and optimizer state
    teacher = load_teacher(tmp_path/'models'/'teacher.pth', tiny_cnn(8))
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), learn.model.state_dict().values()))


def test_mismatching_keys_are_named(tmp_path):
    torch.save(resnet18(weights=None).state_dict(), tmp_path/'plain_resnet.pth')
    with pytest.raises(ValueError, match=r"Missing keys: 0\.0\.weight.*Unexpected keys: conv1\.weight"):
        load_teacher(tmp_path/'plain_resnet.pth', resnet18, 43)


def test_wrong_class_count_is_explained(tmp_path):
    torch.save(tiny_cnn(8, n_out=43).state_dict(), tmp_path/'teacher.pth')
    with pytest.raises(ValueError, match='do not fit the teacher architecture.*n_out'):
        load_teacher(tmp_path/'teacher.pth', tiny_cnn(8, n_out=10))


def test_refuses_to_unpickle_arbitrary_objects(tmp_path, capsys):
    class Payload:
        def __reduce__(self): return (print, ('unpickled!',))
    (tmp_path/'evil.pth').write_bytes(pickle.dumps({'weight': Payload()}))
    with pytest.raises(ValueError, match=rf'^{re.escape(str(tmp_path/"evil.pth"))} is not a PyTorch weights file, or '
                                         r'one cut short or damaged \(UnpicklingError: Unsupported operand \d+\)'):
        load_teacher(tmp_path/'evil.pth', tiny_cnn(8))
    assert 'unpickled!' not in capsys.readouterr().out


def bad_weights(kind: str, folder: Path, digits_path: Path) -> tuple[Path, str]:
    "A file that is no state dict, of `kind`, and the start of what load_teacher says it holds"
    model = tiny_cnn(8)
    if kind == 'json':
        (folder/'student.json').write_text(json.dumps({'arch': 'resnet18', 'size': 32}))
        return folder/'student.json', 'holds JSON text, not weights'
    if kind == 'exported learner':
        Learner(digits_dls(digits_path, size=32, bs=64), model).export(folder/'export.pkl')
        return folder/'export.pkl', ('holds an exported fastai Learner (`learn.export`), not a state dict: load it '
                                     'with `load_learner`')
    if kind == 'whole model':
        torch.save(model, folder/'model.pth')
        return folder/'model.pth', 'holds pickled objects (torch.nn.modules.container.Sequential), not a state dict'
    if kind == 'tensor':
        torch.save(torch.zeros(3), folder/'tensor.pth')
        return folder/'tensor.pth', 'holds a Tensor, not a state dict'
    torch.save(model.state_dict(), folder/'teacher.pth')
    whole = (folder/'teacher.pth').read_bytes()
    (folder/'teacher.pth').write_bytes(whole[:len(whole) // 2] if kind == 'truncated' else b'')
    return folder/'teacher.pth', ('is not a PyTorch weights file, or one cut short or damaged' if kind == 'truncated'
                                  else 'is empty')


BAD_WEIGHTS = ['json', 'exported learner', 'whole model', 'tensor', 'truncated', 'empty']


@pytest.mark.parametrize('kind', BAD_WEIGHTS)
def test_a_file_that_is_no_state_dict_is_named_with_what_it_holds(tmp_path, digits_path, kind):
    path, holds = bad_weights(kind, tmp_path, digits_path)
    with pytest.raises(ValueError, match=f'^{re.escape(f"{path} {holds}")}'): load_teacher(path, tiny_cnn(8))


def test_missing_file_and_missing_class_count(tmp_path):
    with pytest.raises(FileNotFoundError, match='No teacher weights at .*nothing.pth'):
        load_teacher(tmp_path/'nothing.pth', resnet18, 43)
    torch.save(tiny_cnn(8).state_dict(), tmp_path/'teacher.pth')
    with pytest.raises(ValueError, match=r'^n_out is needed to build the teacher from an architecture: pass its class '
                                         r'count\.$'):
        load_teacher(tmp_path/'teacher.pth', resnet18)


def test_a_missing_key_alone_is_refused(tmp_path):
    weights = tiny_cnn(8).state_dict()
    missing = list(weights)[-1]
    torch.save({k: v for k, v in weights.items() if k != missing}, tmp_path/'teacher.pth')
    with pytest.raises(ValueError, match=rf'do not match the teacher architecture\. Missing keys: {re.escape(missing)}\.'):
        load_teacher(tmp_path/'teacher.pth', tiny_cnn(8))


def test_settings_of_the_architecture_reach_create_vision_model(tmp_path):
    "A one-channel ResNet (n_in=1): its weights fit only a teacher built with the same setting"
    trained = create_vision_model(resnet18, 43, pretrained=False, n_in=1)
    torch.save(trained.state_dict(), tmp_path/'gray.pth')
    teacher = load_teacher(tmp_path/'gray.pth', resnet18, 43, n_in=1)
    assert teacher[0][0].weight.shape[1] == 1
