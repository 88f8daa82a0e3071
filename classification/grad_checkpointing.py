"""--grad-checkpointing: the stages of torchvision's classifiers recomputed in the backward pass, to save memory."""
from functools import partial

from torch.utils.checkpoint import checkpoint

from common.log import UserError


def enable_grad_checkpointing(model):
    """Batch-norm statistics see each batch twice, as with timm's checkpoint_seq; EMA's copy drops the patched
    forwards."""
    if hasattr(model, "layer4"):  # ResNet, ResNeXt, Wide ResNet
        stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    elif hasattr(model, "features"):  # ConvNeXt, EfficientNet, MobileNet, Swin
        stages = list(model.features)
    elif hasattr(model, "encoder") and hasattr(model.encoder, "layers"):  # ViT
        stages = list(model.encoder.layers)
    else:
        stages = []
    # Blocks only: single layers save nothing, and an in-place ReLU checkpointed alone modifies a tensor the
    # previous segment needs again (VGG, AlexNet, DenseNet fail so).
    if not stages or any(not list(stage.children()) for stage in stages):
        raise UserError(f"--grad-checkpointing knows the stages of ResNet, ConvNeXt, EfficientNet, MobileNet, "
                        f"Swin and ViT families, not of {type(model).__name__}: drop the flag")
    for stage in stages:
        stage.forward = partial(checkpoint, stage.forward, use_reentrant=False)
