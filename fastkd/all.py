"`from fastkd.all import *`: the public API of every module, fastai-style."
from .callback import *
from .losses import *
from .split import *
from .digits import *
