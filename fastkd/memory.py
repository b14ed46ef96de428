"""`in_memory`: image `DataLoaders` whose items are decoded once and kept in memory, for small images.

fastai runs the item pipeline (open, decode, `Resize`, `ToTensor`) for every image in every epoch, one Python call
chain per item: about 1.4 ms an image here, more than a small student's whole step on a GPU. On data that fits in
memory (GTSRB at 32 px is 120 MB as bytes) `in_memory` runs that pipeline once per split and keeps the results as one
uint8 tensor; each batch is then gathered by index and goes through the same batch transforms (augmentation,
normalisation) as before, so training sees the same kind of batches at a fraction of the cost.
"""
from __future__ import annotations

import torch
from fastai.data.core import DataLoaders, Pipeline, TfmdDL  # Pipeline: fastcore's or fasttransform's, as fastai has it
from fastcore.basics import chunked
from fastprogress.fastprogress import progress_bar
from torch import Tensor

__all__ = ['InMemoryDL', 'in_memory']


class InMemoryDL(TfmdDL):
    """A `TfmdDL` whose items were decoded once: `decoded` holds the output of the item pipeline for every item of
    `dataset`, stacked (one tensor per part of an item, typed as fastai typed them); batches are gathered from it by
    index and then run through `after_batch`. A loader over another dataset (`test_dl`, `new_empty`) is a plain
    `TfmdDL` again."""
    def __init__(self, dataset, decoded: tuple[Tensor, ...] = (), **kwargs):
        self.decoded = decoded
        super().__init__(dataset, **kwargs)

    @classmethod
    def from_dl(cls, dl: TfmdDL, num_workers: int | None = None) -> InMemoryDL:
        """`dl` with every item run through its item pipeline once now (by `num_workers` processes; default: `dl`'s)
        and kept as a CPU tensor; its batch transforms still run on every batch"""
        plain = dl.new(shuffle=False, drop_last=False, after_batch=Pipeline([]), device=torch.device('cpu'),
                       **({} if num_workers is None else dict(num_workers=num_workers)))
        batches = list(progress_bar(plain, leave=False))
        if not batches: raise ValueError('in_memory needs items: this DataLoader is empty.')
        decoded = tuple(type(part)(torch.cat([batch[i] for batch in batches])) for i, part in enumerate(batches[0]))
        return cls(dl.dataset, decoded, bs=dl.bs, shuffle=dl.shuffle, drop_last=dl.drop_last, num_workers=0,
                   device=dl.device, after_item=dl.after_item, before_batch=dl.before_batch,
                   after_batch=dl.after_batch, do_setup=False)

    def create_batches(self, samps):
        for indices in chunked(samps, self.bs, self.drop_last):
            indices = torch.as_tensor(indices)
            yield tuple(part[indices] for part in self.decoded)

    def new(self, dataset=None, cls=None, **kwargs):
        if dataset is not None and dataset is not self.dataset: return super().new(dataset, cls or TfmdDL, **kwargs)
        return super().new(dataset, cls, decoded=self.decoded, **kwargs)


def in_memory(dls: DataLoaders, num_workers: int | None = None) -> DataLoaders:
    """`dls` with every loader an `InMemoryDL` (see `InMemoryDL.from_dl`): each item is opened and transformed once,
    by `dls`'s own item pipeline, and kept as a CPU tensor. Batch transforms still run on every batch, so augmentation
    done there (`aug_transforms`) is drawn anew each epoch, while random *item* transforms (`RandomResizedCrop`,
    `Resize` on images of another shape) are drawn once and then fixed. Items must have one shape after the item
    pipeline (resize them there). Loaders made later for other items (`test_dl`) read from disk as before; pass them
    to `InMemoryDL.from_dl` to keep them in memory too."""
    return DataLoaders(*[InMemoryDL.from_dl(dl, num_workers) for dl in dls.loaders], path=dls.path,
                       device=dls.device)
