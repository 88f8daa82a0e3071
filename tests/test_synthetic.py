import torch
from torch.utils.data import DistributedSampler

from common.data import ShardedEvalSampler, TensorLoader
from classification.data import make_shapes
from common.synthetic import SHAPES


def test_same_seed_same_images_and_splits_differ():
    a_images, a_labels = make_shapes(64, 24, seed=3)
    b_images, b_labels = make_shapes(64, 24, seed=3)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    val_images, _ = make_shapes(64, 24, seed=3, split="val")
    assert not torch.equal(a_images, val_images)


def test_every_class_appears_and_shapes_are_visible():
    images, labels = make_shapes(500, 32, num_classes=len(SHAPES))
    assert images.dtype == torch.uint8 and images.shape == (500, 3, 32, 32)
    assert torch.bincount(labels, minlength=len(SHAPES)).min() > 20
    # A drawn shape differs from the mean background colour far more than the noise does.
    spread = images.float().flatten(2).std(2).mean(1)
    assert (spread > 10).float().mean() > 0.95


def test_tensor_loader_splits_train_across_ranks_without_overlap():
    images, labels = torch.arange(20).view(20, 1, 1, 1), torch.arange(20)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(labels, 2, rank, shuffle=True, seed=0, drop_last=True)
        loader = TensorLoader(images, labels, sampler, 4, lambda x, y: (x, y), drop_last=True)
        assert len(loader) == 2
        seen += [int(i) for _, y in loader for i in y]
    assert len(seen) == len(set(seen)) == 16


def test_tensor_loader_eval_keeps_the_last_partial_batch():
    images, labels = torch.zeros(11, 1, 1, 1), torch.arange(11)
    loader = TensorLoader(images, labels, ShardedEvalSampler(labels, 0, 1), 4, lambda x, y: (x, y), drop_last=False)
    assert [len(y) for _, y in loader] == [4, 4, 3]
