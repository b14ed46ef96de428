"""Execute the tutorials at their default settings and write them back with their outputs, so that they read with
tables and plots on GitHub; cleaned as nbdev's cleaner cleans: no execution counts, no volatile metadata.

    python nbs/run_notebooks.py [00_quickstart.ipynb ...]   # every notebook of nbs/ by default

Each notebook runs in a new temporary working directory on a kernel of this interpreter, and its wall time is
printed (the notebooks quote it in their first cell). tests/test_notebooks.py uses `kernel_dirs`, `execute` and
`clean` to run them at tiny sizes without writing them back, and checks that the committed ones are clean."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nbformat
from ipykernel.kernelspec import install
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NBS = Path(__file__).resolve().parent
KERNEL = 'fastkd-notebooks'
NOTEBOOK_METADATA = {'kernelspec': {'display_name': 'Python 3 (ipykernel)', 'language': 'python', 'name': 'python3'},
                     'language_info': {'name': 'python'}}


def kernel_dirs(prefix: str | Path, env: dict[str, str] | None = None) -> list[str]:
    "Install a kernelspec under `prefix` that runs this interpreter with `env`; the folders that find it"
    install(kernel_name=KERNEL, prefix=str(prefix), env=env or {})
    return [str(Path(prefix)/'share'/'jupyter'/'kernels')]


def execute(nb: nbformat.NotebookNode, cwd: str | Path, dirs: list[str], timeout: int = 1800) -> nbformat.NotebookNode:
    "Run every cell of `nb` in place, in `cwd`, on the kernel of `kernel_dirs`"
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=dirs))
    return NotebookClient(nb, km=km, timeout=timeout, resources={'metadata': {'path': str(cwd)}}).execute()


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """`nb` without what changes from run to run or machine to machine (as `nbdev_clean`): execution counts, cell
    metadata other than tags, output metadata and display ids, notebook metadata other than the kernel's name"""
    nb.metadata = nbformat.from_dict(NOTEBOOK_METADATA)
    for cell in nb.cells:
        cell.metadata = nbformat.from_dict({k: v for k, v in cell.metadata.items() if k == 'tags'})
        if cell.cell_type != 'code': continue
        cell.execution_count = None
        for output in cell.outputs:
            if 'execution_count' in output: output.execution_count = None
            if 'metadata' in output: output.metadata = nbformat.from_dict({})
            output.pop('transient', None)
    return nb


def main(names: list[str]):
    "Execute, clean and write back each notebook of `names`, printing its wall time"
    with tempfile.TemporaryDirectory() as prefix:
        dirs = kernel_dirs(prefix, {'PYTHONWARNINGS': 'ignore::FutureWarning,ignore:IProgress not found'})  # torch.jit's
        # notice, and tqdm's about a widget package the tutorials do not use
        for name in names:
            path = NBS/name
            nb = nbformat.read(path, as_version=4)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as cwd: execute(nb, cwd, dirs)
            print(f'{name}: {time.perf_counter() - start:.0f} s', flush=True)
            nbformat.write(clean(nb), path)


if __name__ == '__main__': main(sys.argv[1:] or sorted(p.name for p in NBS.glob('*.ipynb')))
