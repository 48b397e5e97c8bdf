"""A dataset over images held in memory as one uint8 tensor (synth data, digits, CIFAR-100)."""

from __future__ import annotations

from torch.utils.data import Dataset


class InMemoryImages(Dataset):
    """Items ``(image, label)``: ``self._images[i]`` (uint8 ``(3, H, W)``) as float in [0, 1], then
    ``self.transform``; ``self.targets[i]``. Subclasses set ``_images``, ``targets`` and ``transform``."""

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self._images[index].float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
