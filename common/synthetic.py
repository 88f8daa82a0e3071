"""Built-in synthetic data: shapes on noisy backgrounds, drawn in memory.

Every image is a pure function of (seed, split, index), so two runs, two processes or a resumed run
see exactly the same pictures. The task is easy for a CNN and impossible for a colour or position
shortcut: shape type is the class, while position, size, colours and noise are random.
"""
import torch

SHAPES = ("disk", "ring", "square", "frame", "diamond", "triangle", "plus", "cross", "hbar", "vbar")


def shape_mask(shape, dx, dy, r):
    """Boolean mask of one shape, from offsets (dx, dy) to its centre and its radius r (broadcastable)."""
    ax, ay = dx.abs(), dy.abs()
    thin = r / 3
    if shape == "disk":
        return dx**2 + dy**2 < r**2
    if shape == "ring":
        return ((dx**2 + dy**2) < r**2) & ((dx**2 + dy**2) > (0.55 * r) ** 2)
    if shape == "square":
        return (ax < 0.8 * r) & (ay < 0.8 * r)
    if shape == "frame":
        return (ax < 0.8 * r) & (ay < 0.8 * r) & ((ax > 0.45 * r) | (ay > 0.45 * r))
    if shape == "diamond":
        return ax + ay < r
    if shape == "triangle":  # apex up, base at dy = 0.8 r
        return (dy < 0.8 * r) & (dy > -r) & (ax < (dy + r) * 0.5)
    if shape == "plus":
        return ((ax < thin) & (ay < r)) | ((ay < thin) & (ax < r))
    if shape == "cross":  # the plus turned by 45 degrees
        u, v = (dx + dy).abs() * 0.7071, (dx - dy).abs() * 0.7071
        return ((u < thin) & (v < r)) | ((v < thin) & (u < r))
    if shape == "hbar":
        return (ay < thin) & (ax < r)
    if shape == "vbar":
        return (ax < thin) & (ay < r)
    raise ValueError(f"unknown shape {shape!r}")


def noisy_backgrounds(n, size, generator):
    """Random base colours, a random linear gradient and pixel noise, as float images in [0, 1]."""
    base = torch.rand(n, 3, 1, 1, generator=generator) * 0.8 + 0.1
    ramp = torch.linspace(-0.5, 0.5, size)
    slope = (torch.rand(n, 2, 1, 1, generator=generator) - 0.5) * 0.4
    gradient = slope[:, :1] * ramp.view(1, 1, size, 1) + slope[:, 1:] * ramp.view(1, 1, 1, size)
    return base + gradient, base


def make_shapes(num_samples, image_size=32, num_classes=10, seed=0, split="train", chunk=1024):
    """Return (uint8 images [N, 3, H, W], int64 labels [N]) with one shape per image; label = shape."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"the synthetic set has 2 to {len(SHAPES)} classes, not {num_classes}")
    # Train and val come from different random streams, so validation images are never seen in training.
    generator = torch.Generator().manual_seed(seed * 2 + (split != "train"))
    parts = [_draw_shapes(min(chunk, num_samples - start), image_size, num_classes, generator)
             for start in range(0, num_samples, chunk)]  # in chunks, to bound memory at large image sizes
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def _draw_shapes(n, image_size, num_classes, generator, min_contrast=0.35):
    labels = torch.randint(num_classes, (n,), generator=generator)
    images, background = noisy_backgrounds(n, image_size, generator)
    # Foreground colours are pushed away from the background so every shape stays visible.
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    too_close = (colour - background).abs().amax(1, keepdim=True) < min_contrast
    colour = torch.where(too_close, (background + 0.5) % 1.0, colour)
    radius = (torch.rand(n, generator=generator) * 0.2 + 0.2) * image_size
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
