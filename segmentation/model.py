"""DeepLabV3+, UNet and torchvision's segmentation models, all returning {"out": logits at the input size}
(+ "aux"), so one loss and evaluation serve all."""
import os
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead

from common.checkpoint import load_checkpoint, load_model_state, state_dict_from
from common.log import UserError, is_main_process, print0

OWN_MODELS = ("deeplabv3plus_resnet50", "deeplabv3plus_resnet101", "unet")
TORCHVISION_MODELS = tuple(torchvision.models.list_models(module=torchvision.models.segmentation))
MODELS = OWN_MODELS + TORCHVISION_MODELS
# What a fine-tune to another class count replaces.
HEAD_PREFIXES = ("classifier", "aux_classifier")


def conv_bn_relu(in_channels, out_channels, kernel_size=3):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def upsample_to(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DeepLabV3Plus(nn.Module):
    """Chen et al., 2018: ASPP on layer4, refined with layer1 features at 1/4 scale."""

    def __init__(self, num_classes, backbone="resnet50", output_stride=16, aux_loss=False, weights_backbone=None):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, not {output_stride}")
        # Dilated, not strided: finer maps with the same weights as the ImageNet classifier.
        resnet = getattr(torchvision.models, backbone)(
            weights=weights_backbone, replace_stride_with_dilation=[False, output_stride == 8, True])
        del resnet.avgpool, resnet.fc  # so that their keys leave the state dict
        self.backbone = resnet
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)  # the same field of view at both strides
        self.aspp = ASPP(2048, rates, 256)
        self.project_low = conv_bn_relu(256, 48, kernel_size=1)  # few channels, so ASPP's 256 dominate
        self.decoder = nn.Sequential(conv_bn_relu(256 + 48, 256), conv_bn_relu(256, 256))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.aux_classifier = FCNHead(1024, num_classes) if aux_loss else None

    def forward(self, images):
        b = self.backbone
        low = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(images)))))
        mid = b.layer3(b.layer2(low))
        high = upsample_to(self.aspp(b.layer4(mid)), low.shape[-2:])
        logits = self.classifier(self.decoder(torch.cat([self.project_low(low), high], 1)))
        out = {"out": upsample_to(logits, images.shape[-2:])}
        if self.aux_classifier is not None:
            out["aux"] = upsample_to(self.aux_classifier(mid), images.shape[-2:])
        return out


class UNet(nn.Module):
    """UNet (Ronneberger et al., 2015) with padded convolutions and batch norm."""

    size_divisor = 16  # four 2x downsamplings

    def __init__(self, num_classes, base_width=64, in_channels=3):
        super().__init__()
        widths = [base_width * 2**level for level in range(5)]

        def double_conv(cin, cout):
            return nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout))

        self.encoder = nn.ModuleList([double_conv(cin, cout) for cin, cout in zip([in_channels, *widths], widths)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(4))])
        self.decoder = nn.ModuleList([double_conv(2 * widths[i], widths[i]) for i in reversed(range(4))])
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, images):
        height, width = images.shape[-2:]
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(f"UNet takes height and width divisible by {self.size_divisor}, got {height}x{width}: "
                             f"crop or pad the input to a multiple of {self.size_divisor}")
        skips, x = [], images
        for level, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = block(torch.cat([skip, up(x)], 1))
        return {"out": self.classifier(x)}


def backbone_weights(model_name, weights_backbone):
    """(torchvision weights name or None, local file or None)."""
    if weights_backbone is None or os.path.isfile(weights_backbone):
        return None, weights_backbone
    # deeplabv3plus_resnet50 -> resnet50
    return torchvision_weights("--weights-backbone", weights_backbone, model_name.split("_", 1)[1]).name, None


def torchvision_weights(flag, weights, arch):
    options = torchvision.models.get_model_weights(arch)
    if weights not in options.__members__:
        raise UserError(f"{flag} {weights!r} is neither a file nor a torchvision weights name of {arch} "
                        f"({', '.join(w.name for w in options)})")
    return options[weights]


def create_model(name, num_classes, output_stride=16, aux_loss=False, weights_backbone=None, unet_width=64,
                 weights=None, crop_size=None, grad_checkpointing=False, freeze_backbone=False):
    model = create_architecture(name, num_classes, output_stride, aux_loss, weights_backbone, unet_width)
    if crop_size is not None:
        check_input_size(model, *crop_size, "--crop-size")
    if weights:
        load_weights(model, name, weights)
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    if freeze_backbone:
        from common.freeze import freeze_all_but
        freeze_all_but(model, [child for child, _ in model.named_children() if child != "backbone"])
    return model


def create_architecture(name, num_classes, output_stride=16, aux_loss=False, weights_backbone=None, unet_width=64):
    """`weights_backbone`: a torchvision weights name or a checkpoint of the same ResNet from classification/."""
    if ":" in name:  # package.module:function
        from common.user_model import as_output_dict, build_user_model
        model = build_user_model(name, num_classes)
        model.register_forward_hook(as_output_dict)
        return model
    if name not in MODELS:
        raise UserError(f"unknown --model {name!r}: use one of {', '.join(MODELS)}, or your own as "
                        "package.module:function")
    if name == "unet":
        if weights_backbone or aux_loss:
            raise UserError("unet has no backbone and no auxiliary head: drop --weights-backbone and --aux-loss")
        return UNet(num_classes, unet_width)
    enum_name, path = backbone_weights(name, weights_backbone)
    if name in OWN_MODELS:
        model = DeepLabV3Plus(num_classes, name.split("_")[1], output_stride, aux_loss, enum_name)
    else:
        if path:
            raise UserError(f"--weights-backbone from a file is for {', '.join(OWN_MODELS[:2])}: give {name} a "
                            "torchvision weights name")
        if aux_loss and name.startswith("lraspp"):
            raise UserError(f"{name} has no auxiliary head: drop --aux-loss")
        extra = {"aux_loss": True} if aux_loss else {}  # lraspp has no such argument
        model = torchvision.models.get_model(name, weights=None, weights_backbone=enum_name,
                                             num_classes=num_classes, **extra)
    if path:
        state = state_dict_from(load_checkpoint(path), path)
        load_model_state(model.backbone, {k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    return model


def check_input_size(model, height, width, flag):
    divisor = getattr(model, "size_divisor", 1)
    if height % divisor or width % divisor:
        raise UserError(f"{flag} {height}x{width} does not divide by {divisor}, which {type(model).__name__} needs: "
                        f"use a multiple of {divisor}")


def weights_state(name, weights):
    if os.path.isfile(weights):
        return state_dict_from(load_checkpoint(weights), weights)
    if name not in TORCHVISION_MODELS:
        raise UserError(f"--weights {weights!r} is not a file, and weights names are for torchvision's models "
                        f"({', '.join(TORCHVISION_MODELS)}): give {name} a checkpoint .pth")
    return torchvision_weights("--weights", weights, name).get_state_dict(progress=is_main_process())


def load_weights(model, name, weights):
    """Classifier layers of another class count keep their fresh initialisation."""
    own = model.state_dict()
    # torchvision's weights carry an auxiliary head, of no use without --aux-loss.
    state = {k: v for k, v in weights_state(name, weights).items() if k in own or not k.startswith("aux_classifier.")}
    skipped = load_model_state(model, state, weights, skip_mismatched=[k for k in own if k.startswith(HEAD_PREFIXES)])
    if skipped:
        print0(f"--weights {weights}: {len(skipped)} classifier tensors of another class count start afresh")
    return skipped


def enable_grad_checkpointing(model):
    if isinstance(model, UNet):
        stages = [*model.encoder, *model.decoder]
    elif hasattr(getattr(model, "backbone", None), "layer4"):
        stages = [getattr(model.backbone, f"layer{i}") for i in range(1, 5)]
    else:
        raise UserError(f"--grad-checkpointing knows the ResNet stages of DeepLabV3+, FCN and DeepLabV3 and the "
                        f"blocks of UNet, not the MobileNet backbone of {type(model).__name__}: drop the flag")
    # Whole blocks: an in-place ReLU checkpointed alone would modify a tensor the previous segment needs again.
    for stage in stages:
        stage.forward = partial(checkpoint, stage.forward, use_reentrant=False)
