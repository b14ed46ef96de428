"fastkd: knowledge distillation for fastai."
from importlib.metadata import PackageNotFoundError, version

try: __version__ = version('fastkd')  # settings.ini is the single source, through the installed metadata
except PackageNotFoundError: __version__ = 'unknown'
