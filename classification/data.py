"""Classification data: ImageFolder trees checked up front, torchvision v2 presets, and the synthetic set."""
import os
from collections import Counter

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from classification.gpu_preset import EncodedSamples, GpuPreset, collate_encoded
from common.data import SeededSamples, ShardedEvalSampler, TensorLoader, ignore_stop_signals, training_sampler
from common.device_loader import DeviceLoader, SyntheticBatches
from common.images import MEAN, STD, NormalizeBytes, not_a_file_error, read_image, reason, shown
from common.log import UserError, print0
from common.synthetic import SHAPES, contrasting_colours, noisy_backgrounds, shape_mask

# torchvision's list and the other photo formats Pillow reads (of a GIF, the first frame).
IMAGE_EXTENSIONS = datasets.folder.IMG_EXTENSIONS + (".jfif", ".jpe", ".gif", ".apng", ".avif", ".pbm", ".pnm")
LAYOUT_HINT = "--data-path must hold train/ and val/, each with one folder of images per class (ImageNet layout)"


def list_classes(split_dir):
    """Class folder names of one split; stops on a missing split, a class folder that is a dangling symlink, or
    an empty class folder. Hidden folders (.thumbnails, .ipynb_checkpoints) are not classes: skipped, in a note."""
    if not os.path.isdir(split_dir):
        raise UserError(f"split folder {shown(split_dir)} not found: {LAYOUT_HINT}")
    classes, hidden = [], []
    for entry in sorted(os.scandir(split_dir), key=lambda entry: entry.name):
        if entry.name.startswith("."):
            hidden += [entry.name] if entry.is_dir() else []
        elif entry.is_dir():
            classes.append(entry.name)
        elif entry.is_symlink() and not os.path.exists(entry.path):
            # Dropping it would shift the label index of every class sorted after it.
            raise not_a_file_error(entry.path, "class folder")
    if hidden:
        print0(f"note: hidden folders are not classes, skipped in {shown(split_dir)}: {', '.join(map(shown, hidden))}")
    if not classes:
        raise UserError(f"{shown(split_dir)} has no class folders: {LAYOUT_HINT}")
    for name in classes:
        folder = os.path.join(split_dir, name)
        if not any(not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)
                   for entry in os.scandir(folder)):
            raise UserError(f"class folder {shown(folder)} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add images or remove the folder")
    return classes


class ImageFolderWithClasses(datasets.ImageFolder):
    """ImageFolder whose class -> index map is given, so val uses train's indices even with classes absent."""

    def __init__(self, root, classes, transform):
        if len(classes) < 2:  # one class is always right: "100% top-1" that means nothing
            raise UserError(f"{shown(root)} is read with {len(classes)} class ({', '.join(map(shown, classes))}): "
                            "a classifier needs at least 2: give train/ and val/ one folder of images per class")
        self.fixed_classes = classes
        super().__init__(root, transform=transform, loader=read_image, allow_empty=True)

    def find_classes(self, directory):
        return self.fixed_classes, {name: i for i, name in enumerate(self.fixed_classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """(path, class index) of the images under each class folder, in torchvision's order. Unlike
        torchvision's walk, hidden files and folders are skipped, other files are counted in a note, and a
        listed image that is no regular file, a folder that cannot be listed or a symlink loop stops the run
        (torchvision would hang on a FIFO, silently skip the folder, or list the images of a loop dozens of times)."""
        samples, skipped, hidden = [], Counter(), 0
        for name, class_index in sorted(class_to_idx.items()):
            folders, pending = [], [(os.path.join(directory, name), ())]
            if not os.path.isdir(pending[0][0]):
                continue  # a class of train/ that val/ lacks
            while pending:
                folder, ancestors = pending.pop()
                try:
                    info, entries = os.stat(folder), sorted(os.scandir(folder), key=lambda entry: entry.name)
                except OSError as e:
                    raise UserError(f"cannot list folder {shown(folder)} ({reason(e)}): "
                                    "fix its permissions or remove it") from None
                here = (info.st_dev, info.st_ino)
                if here in ancestors:
                    raise UserError(f"folder {shown(folder)} leads back to {shown(os.path.realpath(folder))}, "
                                    "which holds it (a symlink loop): remove the link")
                files = []
                for entry in entries:
                    if entry.name.startswith("."):
                        hidden += 1
                    elif entry.is_dir():
                        pending.append((entry.path, ancestors + (here,)))
                    elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                        if not entry.is_file():
                            raise not_a_file_error(entry.path)
                        files.append(entry.path)
                    else:
                        skipped[os.path.splitext(entry.name)[1].lower() or "(no extension)"] += 1
                folders.append((folder, files))
            for _, files in sorted(folders):
                samples += [(path, class_index) for path in files]
        notes = [f"{hidden} hidden files or folders (names starting with '.')"] if hidden else []
        if skipped:
            kinds = ", ".join(f"{count} {shown(ext)}" for ext, count in skipped.most_common(5))
            more = f" and {len(skipped) - 5} other kinds" if len(skipped) > 5 else ""
            notes.append(f"files not named as images: {kinds}{more} (images end in {', '.join(IMAGE_EXTENSIONS)})")
        if notes:
            print0(f"note: skipped under {shown(directory)}: {'; '.join(notes)}")
        return samples


def train_preset(args):
    interpolation = v2.InterpolationMode(args.interpolation)
    steps = [v2.RandomResizedCrop(args.train_crop_size, scale=args.train_crop_scale, ratio=args.train_crop_ratio,
                                  interpolation=interpolation, antialias=True),
             v2.RandomHorizontalFlip()]
    if args.auto_augment == "ra":
        steps.append(v2.RandAugment(interpolation=interpolation))
    elif args.auto_augment == "ta_wide":
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    elif args.auto_augment == "augmix":
        steps.append(v2.AugMix(interpolation=interpolation))
    elif args.auto_augment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(args.auto_augment), interpolation=interpolation))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if args.random_erase > 0:
        steps.append(v2.RandomErasing(p=args.random_erase))
    return v2.Compose(steps)


def val_preset(resize_size, crop_size, interpolation="bilinear"):
    return v2.Compose([v2.Resize(resize_size, interpolation=v2.InterpolationMode(interpolation), antialias=True),
                       v2.CenterCrop(crop_size), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(MEAN, STD)])


def batch_mixer(args, num_classes):
    """MixUp and/or CutMix on whole batches (one of them per batch), or None."""
    mixers = [mixer(alpha=alpha, num_classes=num_classes) for mixer, alpha in
              ((v2.MixUp, args.mixup_alpha), (v2.CutMix, args.cutmix_alpha)) if alpha > 0]
    return v2.RandomChoice(mixers) if mixers else None


class MixedBatches:
    """A DataLoader's batches through MixUp/CutMix in the main process, where the training loop seeds every step.
    In the workers' collate function they would draw from a worker's stream, which depends on which worker gets
    which batch: a run resumed mid-epoch would mix differently."""

    def __init__(self, loader, mixer):
        self.loader, self.mixer = loader, mixer
        self.sampler, self.dataset, self.batch_size = loader.sampler, loader.dataset, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)  # made now, in the training thread, from the stream the loop just seeded
        return (self.mixer(*batch) for batch in batches)


def make_shapes(num_samples, image_size=32, num_classes=10, seed=0, split="train", chunk=1024):
    """Return (uint8 images [N, 3, H, W], int64 labels [N]) with one shape per image; label = shape."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"the synthetic set has 2 to {len(SHAPES)} classes, not {num_classes}")
    # Train and val come from different random streams, so validation images are never seen in training.
    generator = torch.Generator().manual_seed(seed * 2 + (split != "train"))
    parts = [_draw_shapes(min(chunk, num_samples - start), image_size, num_classes, generator)
             for start in range(0, num_samples, chunk)]  # in chunks, to bound memory at large image sizes
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def _draw_shapes(n, image_size, num_classes, generator):
    labels = torch.randint(num_classes, (n,), generator=generator)
    images, background = noisy_backgrounds(n, image_size, generator)
    colour = contrasting_colours(n, background, generator)
    # Shapes span 60-90% of the image side, so that at 32 px ResNet-18's stride-4 stem still sees their outline:
    # it passes 90% in about 60% of the steps that shapes of 40-80% took (measured 2026-12-01).
    radius = (torch.rand(n, generator=generator) * 0.15 + 0.3) * image_size
    centre = radius[:, None] + torch.rand(n, 2, generator=generator) * (image_size - 2 * radius[:, None])
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)
    for k in range(num_classes):
        idx = (labels == k).nonzero().squeeze(1)
        mask = shape_mask(SHAPES[k], dx[idx], dy[idx], radius[idx].view(-1, 1, 1))
        images[idx] = torch.where(mask[:, None], colour[idx], images[idx])
    images += torch.randn(images.shape, generator=generator) * 0.08
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def synthetic_split(args, split, device):
    """(images, labels) of the built-in shapes set, already on `device`; image size = --train-crop-size."""
    size = args.synthetic_train_size if split == "train" else args.synthetic_val_size
    images, labels = make_shapes(size, args.train_crop_size, args.synthetic_classes, seed=0, split=split)
    return images.to(device), labels.to(device)


def synthetic_loader(images, labels, args, env, train, mixer=None):
    normalize = NormalizeBytes(images.device)

    def transform(images, labels):
        if train:  # per-sample flips: v2.RandomHorizontalFlip on a batch tensor flips all or none
            flip = torch.rand(len(images), device=images.device) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        images = normalize(images)
        return mixer(images, labels) if mixer is not None else (images, labels)

    sampler = train_sampler(labels, args, env) if train else ShardedEvalSampler(labels, env.rank, env.world_size)
    return TensorLoader(images, labels, sampler, args.batch_size, transform, drop_last=train)


def train_sampler(dataset, args, env):
    return training_sampler(dataset, env, args, args.ra_reps if args.ra_sampler else 0)


def dataset_classes(args):
    """Class names in label order: the sorted class folders of train/, or the synthetic shapes."""
    if args.data_path is None:
        return list(SHAPES[:args.synthetic_classes])
    return list_classes(os.path.join(args.data_path, "train"))


def random_batches(args, device, num_classes, size):
    """--data-backend synthetic: random batches of the real data's shape, already on the device."""
    def make_batch():
        return (torch.randn(args.batch_size, 3, size, size, device=device),
                torch.randint(num_classes, (args.batch_size,), device=device))
    return make_batch


def device_loader(folder, args, env, device, train, seed=0, mixer=None):
    """--data-backend gpu: workers read file bytes, the device decodes and augments whole batches."""
    encoded = EncodedSamples(folder.samples)
    sampler = train_sampler(encoded, args, env) if train else ShardedEvalSampler(encoded, env.rank, env.world_size)
    loader = DataLoader(encoded, batch_size=args.batch_size, num_workers=args.workers, sampler=sampler,
                        collate_fn=collate_encoded, drop_last=train, worker_init_fn=ignore_stop_signals)
    size = args.train_crop_size if train else args.val_crop_size
    crop_range = dict(scale=args.train_crop_scale, ratio=args.train_crop_ratio) if train else {}
    preset = GpuPreset([path for path, _ in folder.samples], device, train, size, args.val_resize_size, MEAN, STD,
                       **crop_range)
    return DeviceLoader(loader, preset, device, seed, after=mixer)


def load_train(args, env, device, class_names):
    """The training loader; each rank reads its own 1/world_size of every epoch."""
    mixer = batch_mixer(args, len(class_names))
    if args.data_path is None:
        return synthetic_loader(*synthetic_split(args, "train", device), args, env, True, mixer)
    if args.data_backend != "pil" and (args.auto_augment or args.random_erase):
        raise UserError(f"--auto-augment and --random-erase run in the pil backend only: drop them or use "
                        f"--data-backend pil instead of {args.data_backend}")
    folder = ImageFolderWithClasses(os.path.join(args.data_path, "train"), class_names, train_preset(args))
    if args.data_backend == "gpu":
        return device_loader(folder, args, env, device, True, args.seed, mixer)
    if args.data_backend == "synthetic":
        sampler = train_sampler(folder, args, env)
        make_batch = random_batches(args, device, len(class_names), args.train_crop_size)
        return SyntheticBatches(make_batch, len(sampler) // args.batch_size, sampler, args.batch_size)
    train_set = SeededSamples(folder, args.seed)
    # No persistent workers: fresh workers each epoch take their seeds from the per-epoch RNG, which keeps
    # a resumed run identical to an uninterrupted one.
    loader = DataLoader(train_set, batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda", sampler=train_sampler(train_set, args, env), drop_last=True,
                        worker_init_fn=ignore_stop_signals)
    return MixedBatches(loader, mixer) if mixer else loader


def load_val(args, env, device, class_names):
    """Validation loader whose labels index `class_names`; every sample lands on exactly one rank."""
    if args.data_path is None:
        return synthetic_loader(*synthetic_split(args, "val", device), args, env, False)
    val_dir = os.path.join(args.data_path, "val")
    unknown = sorted(set(list_classes(val_dir)) - set(class_names))
    if unknown:
        raise UserError(f"{val_dir} has class folders the model was not trained on: {', '.join(unknown[:5])}: "
                        "add them to train/ or remove them from val/")
    val_set = ImageFolderWithClasses(val_dir, class_names,
                                     val_preset(args.val_resize_size, args.val_crop_size, args.interpolation))
    if args.data_backend == "gpu":
        return device_loader(val_set, args, env, device, train=False)
    return DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers,
                      pin_memory=device.type == "cuda", sampler=ShardedEvalSampler(val_set, env.rank, env.world_size),
                      worker_init_fn=ignore_stop_signals)
