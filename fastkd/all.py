"`from fastkd.all import *`: the public API of every module, fastai-style."
from .callback import *
from .hints import *
from .cache import *
from .store import *
from .losses import *
from .tasks import *
from .split import *
from .digits import *
from .files import *
from .gtsrb import *
from .memory import *
from .compression import *
from .report import *
from .tta import *
from .runs import *
from .workflow import *
from .kd_find import *
