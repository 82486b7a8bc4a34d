"""A device-resident batch loader for small datasets (airbench-style).

The uint8 images are uploaded to the device once; every batch is cut, augmented and
normalised there (random crop with padding, horizontal flip, per spec §3's CIFAR pipeline):
no DataLoader workers, no host round trip. On the CPU the same code runs on CPU tensors.
"""
import math

import torch
import torch.nn.functional as F


class TensorLoader:
    """Iterate ``(images float [B, C, H, W], labels int64 [B])`` over an ArrayDataset.

    ``train=True``: reshuffled every epoch (``torch.Generator`` seeded by ``seed + epoch``,
    so an epoch's order does not depend on what ran before it), random crop with ``pad``
    (reflect) and horizontal flip; the last partial batch is dropped (``drop_last``).
    ``train=False``: fixed order, no augmentation, every sample once.
    ``shard=(rank, world)``: every rank draws the same global permutation per epoch and takes
    its ``rank::world`` slice, so ranks never overlap and all have the same number of batches.
    """

    def __init__(self, dataset, batch_size, device="cpu", train=True, pad=4, flip=True,
                 drop_last=None, seed=0, dtype=torch.float32, channels_last=False,
                 shard=(0, 1)):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.rank, self.world = shard
        if not 0 <= self.rank < self.world:
            raise ValueError(f"bad shard {shard}: need 0 <= rank < world")
        if not train:  # evaluation: a fixed slice per rank
            dataset = type(dataset)(dataset.images[self.rank::self.world],
                                    dataset.labels[self.rank::self.world], dataset.num_classes,
                                    dataset.mean, dataset.std, dataset.name)
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.per_rank = len(self.labels) // self.world if train else len(self.labels)
        if train and batch_size > self.per_rank:
            raise ValueError(f"batch size {batch_size} is larger than the dataset "
                             f"({self.per_rank} samples per rank)")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = train
        self.pad = pad if train else 0
        self.flip = flip and train
        self.drop_last = train if drop_last is None else drop_last
        self.seed = seed
        self.epoch = 0
        self.dtype = dtype
        self.channels_last = channels_last
        c = self.images.shape[1]
        self.mean = torch.tensor(dataset.mean, device=device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(dataset.std, device=device).view(1, c, 1, 1) * 255

    def __len__(self):
        n = self.per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _order(self):
        if not self.train:
            return torch.arange(len(self.labels), device=self.device)
        g = torch.Generator(device=self.device).manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(len(self.labels), device=self.device, generator=g)
        return perm[self.rank::self.world][:self.per_rank]

    def augment(self, x, g):
        """Random crop (reflect padding) and horizontal flip of a float batch, on its device."""
        n, _, h, w = x.shape
        if self.pad:
            p = self.pad
            xp = F.pad(x, (p, p, p, p), mode="reflect")
            dy = torch.randint(0, 2 * p + 1, (n, 1), device=x.device, generator=g)
            dx = torch.randint(0, 2 * p + 1, (n, 1), device=x.device, generator=g)
            rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(-1, x.shape[1], h, w + 2 * p)
            xp = xp.gather(2, rows)
            cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(-1, x.shape[1], h, w)
            x = xp.gather(3, cols)
        if self.flip:
            coin = torch.rand(n, 1, 1, 1, device=x.device, generator=g) < 0.5
            x = torch.where(coin, x.flip(3), x)
        return x

    def __iter__(self):
        order = self._order()
        g = None
        if self.train:
            g = torch.Generator(device=self.device).manual_seed(
                self.seed * 100003 + self.epoch + 7919 * (self.rank + 1))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx].float()
            if self.train:
                x = self.augment(x, g)
            x = ((x - self.mean) / self.std).to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
