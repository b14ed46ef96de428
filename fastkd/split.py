"""`default_split`: body and head parameter groups, so `freeze_to(1)` trains the head alone."""
from __future__ import annotations

from fastai.torch_core import params
from fastcore.foundation import L
from torch import nn

__all__ = ['default_split']


def _body_and_head(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    "The modules of the body and the head of `model`, for the layouts we know"
    if isinstance(model, nn.Sequential) and len(model) == 2: return [model[0]], model[1]  # create_vision_model
    if isinstance(getattr(model, 'fc', None), nn.Module):  # torchvision ResNet, Inception, GoogLeNet...
        return [m for name, m in model.named_children() if name != 'fc'], model.fc
    features, classifier = getattr(model, 'features', None), getattr(model, 'classifier', None)
    if isinstance(features, nn.Module) and isinstance(classifier, nn.Module):
        return [model.features], model.classifier  # VGG, DenseNet, MobileNet, EfficientNet...
    raise ValueError(f'default_split cannot tell the body from the head of {type(model).__name__}: it knows '
                     '`create_vision_model` models (Sequential(body, head)), models with an `fc` head (torchvision '
                     'ResNets) and `features`/`classifier` pairs. Pass your own `splitter` to the Learner.')


def default_split(model: nn.Module) -> L:
    "Parameter groups (body, head) of `model`; an error, not one silent group, when the layout is unknown"
    body, head = _body_and_head(model)
    return L(sum((params(m) for m in body), []), params(head))
