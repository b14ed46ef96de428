"load_teacher: an architecture plus a state dict file, loaded with weights_only=True, frozen."
import pickle
import re

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


def test_refuses_to_unpickle_arbitrary_objects(tmp_path):
    class Payload:
        def __reduce__(self): return (print, ('unpickled!',))
    (tmp_path/'evil.pth').write_bytes(pickle.dumps({'weight': Payload()}))
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        load_teacher(tmp_path/'evil.pth', tiny_cnn(8))


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
