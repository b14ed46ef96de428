"default_split on the model layouts it knows, and a clear error on the others."
import pytest
from fastai.torch_core import params
from fastai.vision.learner import create_vision_model
from torch import nn
from torchvision.models import mobilenet_v3_small, resnet18

from conftest import tiny_cnn
from fastkd.split import default_split


def ids(ps): return {id(p) for p in ps}


@pytest.mark.parametrize('model,head', [
    (create_vision_model(resnet18, 43, pretrained=False), lambda m: m[1]),
    (resnet18(weights=None, num_classes=43), lambda m: m.fc),
    (mobilenet_v3_small(weights=None, num_classes=43), lambda m: m.classifier),
    (tiny_cnn(8), lambda m: m[1])], ids=['create_vision_model', 'torchvision_resnet', 'features_classifier', 'sequential'])
def test_two_groups_body_then_head_covering_every_parameter(model, head):
    body_group, head_group = default_split(model)
    assert ids(head_group) == ids(params(head(model)))
    assert ids(body_group) | ids(head_group) == ids(params(model))
    assert not ids(body_group) & ids(head_group) and len(body_group) > 0


def test_unknown_layout_is_an_error_not_one_silent_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match='cannot tell the body from the head of Sequential.*splitter'):
        default_split(model)
