"""--data-backend synthetic, imported only with it (the built-in data set of the default run is common/synthetic.py)."""
import torch


class SyntheticBatches:
    """--data-backend synthetic: a few random batches already on the device, reused, so that a run measures the
    model step alone."""

    def __init__(self, shapes, num_classes, device, sampler, distinct=4):
        (image_shape, target_shape), self.batch_size = shapes, shapes[0][0]
        self.sampler, self.dataset = sampler, sampler.dataset
        self.batches = [(torch.randn(image_shape, device=device),
                         torch.randint(num_classes, target_shape, device=device)) for _ in range(distinct)]

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        for i in range(len(self)):
            yield self.batches[i % len(self.batches)]
