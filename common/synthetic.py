"""Drawing the built-in synthetic sets: shapes, noisy backgrounds, colours that stand out."""
import torch

SHAPES = ("disk", "ring", "square", "frame", "diamond", "triangle", "plus", "cross", "hbar", "vbar")


def shape_mask(shape, dx, dy, r):
    """From offsets (dx, dy) to the shape's centre and its radius r (broadcastable)."""
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
    """(images: random base colours plus a random linear gradient, the base colours)."""
    base = torch.rand(n, 3, 1, 1, generator=generator) * 0.8 + 0.1
    ramp = torch.linspace(-0.5, 0.5, size)
    slope = (torch.rand(n, 2, 1, 1, generator=generator) - 0.5) * 0.4
    gradient = slope[:, :1] * ramp.view(1, 1, size, 1) + slope[:, 1:] * ramp.view(1, 1, 1, size)
    return base + gradient, base


def contrasting_colours(n, background, generator, min_contrast=0.35):
    """[n, 3, 1, 1], pushed away from `background` where too close, so every shape stays visible."""
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    too_close = (colour - background).abs().amax(1, keepdim=True) < min_contrast
    return torch.where(too_close, (background + 0.5) % 1.0, colour)
