"""The offline depth example: rendered rooms with exact depth.

:func:`make_depth_example` ray-casts random scenes through a pinhole camera: a box-shaped room (floor, ceiling,
side walls, back wall) with spheres and boxes standing on the floor. Every pixel's depth is computed in closed form
(the distance along the optical axis to the first surface its central ray meets), so the ground truth is exact up to
the millimetre the 16-bit PNG stores. Surfaces are textured (a checkerboard floor, striped walls) and shaded
(Lambertian, one light), so that perspective, occlusion, shading and texture gradients all carry depth. A "window" in
the back wall has no depth (0 in the PNG), as glass gives an RGB-D sensor no return: the loss and the metrics must
skip it. It writes the folder layout that :mod:`pvtv2.data.depth` reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import PIL.Image

from .depth import write_depth_png

__all__ = ["EXAMPLE_MAX_DEPTH", "camera_rays", "make_depth_example", "render_scene"]

logger = logging.getLogger(__name__)

# The farthest surface a scene can have (the back wall's corners): within GLPN's default max_depth of 10 m.
EXAMPLE_MAX_DEPTH = 9.0

_FOV_DEGREES = 60.0


def camera_rays(size: int) -> np.ndarray:
    """(size, size, 3) ray directions with z = 1, so that depth (along the optical axis) is the ray parameter t."""
    focal = size / (2 * np.tan(np.radians(_FOV_DEGREES) / 2))
    centres = (np.arange(size) + 0.5 - size / 2) / focal
    x = np.broadcast_to(centres[None, :], (size, size))
    y = np.broadcast_to(-centres[:, None], (size, size))  # image rows go down, y goes up
    return np.stack([x, y, np.ones((size, size))], axis=-1)


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: an (size, size, 3) uint8 image and its (size, size) depth in metres (0 where there is none)."""
    rays = camera_rays(size)  # (H, W, 3)
    far = np.full((size, size), np.inf)
    normal = np.zeros((size, size, 3))
    albedo = np.zeros((size, size, 3))

    height, ceiling = rng.uniform(1.0, 1.6), rng.uniform(1.0, 1.5)  # camera above the floor, below the ceiling
    left, right = rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0)
    back = rng.uniform(4.0, EXAMPLE_MAX_DEPTH)
    colours = rng.uniform(40, 220, (6, 3))

    def hit(t: np.ndarray, n: tuple[float, float, float] | np.ndarray, colour: np.ndarray) -> None:
        """Keep the surface where it is nearer than what was found so far."""
        nearer = (t > 1e-6) & (t < far)
        far[nearer] = t[nearer]
        normal[nearer] = n if isinstance(n, tuple) else n[nearer]
        albedo[nearer] = colour if colour.ndim == 1 else colour[nearer]

    dx, dy, dz = rays[..., 0], rays[..., 1], rays[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        # The room: planes y = -height (floor), y = ceiling, x = -left, x = right, z = back.
        t_floor = np.where(dy < 0, -height / dy, np.inf)
        points = rays * t_floor[..., None]
        checker = (np.floor(points[..., 0] / 0.5) + np.floor(points[..., 2] / 0.5)) % 2
        hit(t_floor, (0.0, 1.0, 0.0), colours[0] * (0.6 + 0.4 * checker[..., None]))
        hit(np.where(dy > 0, ceiling / dy, np.inf), (0.0, -1.0, 0.0), colours[1])
        for wall, sign, colour in ((left, -1.0, colours[2]), (right, 1.0, colours[3])):
            t_wall = np.where(sign * dx > 0, wall / (sign * dx), np.inf)
            stripes = (np.floor((rays[..., 2] * t_wall) / 0.4) % 2)[..., None]
            hit(t_wall, (-sign, 0.0, 0.0), colour * (0.75 + 0.25 * stripes))
        t_back = back / dz
        hit(t_back, (0.0, 0.0, -1.0), colours[4])

        # Objects on the floor: spheres and boxes, in front of the back wall, between the side walls.
        for _ in range(int(rng.integers(1, 4))):
            radius = rng.uniform(0.25, 0.7)
            centre = np.array([rng.uniform(-left + radius, right - radius), -height + radius,
                               rng.uniform(1.5 + radius, back - radius)])
            # |t d - c|^2 = r^2: a t^2 - 2 b t + (|c|^2 - r^2) = 0 with a = |d|^2, b = d.c
            a = (rays**2).sum(-1)
            b = rays @ centre
            disc = b * b - a * (centre @ centre - radius**2)
            t_sphere = np.where(disc >= 0, (b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
            surface = rays * t_sphere[..., None] - centre
            hit(t_sphere, surface / radius, rng.uniform(40, 240, 3))
        for _ in range(int(rng.integers(0, 3))):
            half = rng.uniform(0.2, 0.6, 3)
            centre = np.array([rng.uniform(-left + half[0], right - half[0]), -height + half[1],
                               rng.uniform(1.5 + half[2], back - half[2])])
            low, high = centre - half, centre + half
            # Slab method: the entry point is the largest of the three near-plane hits.
            t1, t2 = (low - 0.0) / rays, (high - 0.0) / rays
            near, exit_ = np.minimum(t1, t2), np.maximum(t1, t2)
            t_enter, t_exit = near.max(-1), exit_.min(-1)
            inside = (t_enter <= t_exit) & (t_enter > 0)
            axis = near.argmax(-1)
            box_normal = np.zeros((size, size, 3))
            np.put_along_axis(box_normal, axis[..., None], -np.sign(np.take_along_axis(rays, axis[..., None], -1)), -1)
            hit(np.where(inside, t_enter, np.inf), box_normal, rng.uniform(40, 240, 3))

    # A window in the back wall: no depth there (an RGB-D sensor gets no return from glass), sky seen through it.
    points = rays * far[..., None]
    wx, wy = rng.uniform(-1.0, 0.5), rng.uniform(-0.2, 0.4)
    window = (np.abs(points[..., 2] - back) < 1e-9) & (np.abs(points[..., 0] - wx) < 0.6) & (np.abs(points[..., 1] - wy) < 0.4)

    light = np.array([rng.uniform(-1, 1), ceiling - 0.05, rng.uniform(1, back)])
    to_light = light - points
    to_light /= np.linalg.norm(to_light, axis=-1, keepdims=True)
    lambert = np.clip((normal * to_light).sum(-1), 0, 1)[..., None]
    image = albedo * (0.35 + 0.65 * lambert)
    image[window] = np.array([170.0, 200.0, 245.0])
    image += rng.normal(0, 3, image.shape)
    depth = np.where(window, 0.0, far)
    return np.clip(image, 0, 255).round().astype(np.uint8), depth


def make_depth_example(
    folder: str | os.PathLike, n_train: int = 200, n_val: int = 50, size: int = 64, seed: int = 0
) -> Path:
    """Write the rendered-rooms example into ``folder`` (``train`` / ``val`` images and 16-bit depth PNGs in
    millimetres); returns the folder. The same arguments give the same files, byte for byte."""
    for name, value in (("n_train", n_train), ("n_val", n_val), ("size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if size < 32 or size % 32:
        raise ValueError(f"size must be a multiple of 32 (GLPN's decoder), at least 32, got {size}")
    root = Path(folder)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "depth").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, depth = render_scene(rng, size)
            PIL.Image.fromarray(image).save(root / split / "images" / f"{i:05d}.png")
            write_depth_png(root / split / "depth" / f"{i:05d}.png", depth)
    logger.info("wrote the depth example (%d train, %d val, %dx%d) to %s", n_train, n_val, size, size, root)
    return root
