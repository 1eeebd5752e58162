"""Synthetic VOC: a procedural detection data set written to disk in VOC layout.

Every VOC class name has its own object family, drawn from a small shape grammar (a bus is a long
box with a row of windows and two wheels, a horse a body on four long legs with a raised neck, a
bicycle two open rings joined by a thin frame, ...). Each drawing varies in size, aspect, variant,
colour (per-class HSV ranges that deliberately overlap: cat/dog/horse browns, bus/train yellows,
white aeroplanes/sheep/cows), texture (stripes, spots, low-frequency noise), rotation and mirroring.
Backgrounds are gradients plus noise plus random clutter (lines, blobs, boxes, polygons: the same
primitives objects are made of), sometimes with foreground poles that occlude objects.

Image composition rule (what the class shards rely on):
  * a primary class is drawn uniformly from `classes`; with probability 0.45 a second, different
    class is drawn too. Every image therefore holds ONE or TWO classes, never more;
  * 1-4 objects (probabilities 0.35/0.30/0.20/0.15); the first object is the primary class, the
    second the secondary class (when there is one), each further one is the primary class with
    probability 0.6; paint order is random, so later objects occlude earlier ones.

Annotation rule: the box is the tight box of the object's VISIBLE pixels (inside the image and not
covered by later objects or foreground poles), as VOC annotators do. An object is left out when less
than 10% of it (or fewer than 10 pixels) stays visible; it is `difficult` when less than 35% is
visible or its visible box is tiny (sqrt(area) < 8% of the image side); `truncated` when part of it
lies outside the image; `occluded` when something in front covers part of it.

Everything is deterministic by seed: image i is drawn from ``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from data.voc import VOC_CLASSES, DataError, check_class_names

# Bump when the drawing code changes: it is part of the cache key, so old caches are regenerated.
GENERATOR_VERSION = 2
JPEG_QUALITY = 95

Color = tuple[int, int, int]


# ----------------------------------------------------------------------------------------------
# Colours


def _hsv(rng: np.random.Generator, palette: tuple[float, ...]) -> Color:
    """One colour from an HSV box (hue in degrees, s and v in [0, 1])."""
    h0, h1, s0, s1, v0, v1 = palette
    h = (rng.uniform(h0, h1) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return int(r * 255), int(g * 255), int(b * 255)


def _shade(color: Color, factor: float) -> Color:
    """Darker (< 1) or lighter (> 1) version of a colour."""
    return tuple(int(min(255, max(0, c * factor))) for c in color)  # type: ignore[return-value]


def _any_color(rng: np.random.Generator) -> Color:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


SKIN = (15, 35, 0.25, 0.6, 0.35, 0.95)
DARK = (0, 360, 0.0, 0.15, 0.02, 0.2)
GLASS = (190, 230, 0.1, 0.4, 0.15, 0.45)
WOOD = (15, 35, 0.4, 0.8, 0.3, 0.7)


# ----------------------------------------------------------------------------------------------
# Drawing into a sprite: colour image + mask, coordinates as fractions of the sprite


class _Pen:
    """Draws the same shape into an RGB sprite and its L mask (255 = object pixel).

    x/y are fractions of the sprite's width/height; radii and line widths are fractions of its
    shorter side, so circles stay round whatever the aspect.
    """

    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.m = min(w, h)
        self.rgb = Image.new("RGB", (w, h))
        self.mask = Image.new("L", (w, h), 0)
        self._d = ImageDraw.Draw(self.rgb)
        self._dm = ImageDraw.Draw(self.mask)

    def _p(self, x: float, y: float) -> tuple[float, float]:
        return x * (self.w - 1), y * (self.h - 1)

    def _box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        a, b = self._p(min(x0, x1), min(y0, y1))
        c, d = self._p(max(x0, x1), max(y0, y1))
        return [a, b, c, d]

    def rect(self, x0, y0, x1, y1, color: Color) -> None:
        box = self._box(x0, y0, x1, y1)
        self._d.rectangle(box, fill=color)
        self._dm.rectangle(box, fill=255)

    def rrect(self, x0, y0, x1, y1, color: Color, radius: float = 0.15) -> None:
        box = self._box(x0, y0, x1, y1)
        r = max(1.0, radius * min(box[2] - box[0], box[3] - box[1]))
        self._d.rounded_rectangle(box, radius=r, fill=color)
        self._dm.rounded_rectangle(box, radius=r, fill=255)

    def ellipse(self, x0, y0, x1, y1, color: Color) -> None:
        box = self._box(x0, y0, x1, y1)
        self._d.ellipse(box, fill=color)
        self._dm.ellipse(box, fill=255)

    def circle(self, cx, cy, r, color: Color, ring: float = 0.0) -> None:
        """Filled circle, or an open ring of width `ring` (both fractions of the shorter side)."""
        px, py = self._p(cx, cy)
        rr = max(1.0, r * self.m)
        box = [px - rr, py - rr, px + rr, py + rr]
        if ring > 0:
            width = max(1, round(ring * self.m))
            self._d.ellipse(box, outline=color, width=width)
            self._dm.ellipse(box, outline=255, width=width)
        else:
            self._d.ellipse(box, fill=color)
            self._dm.ellipse(box, fill=255)

    def poly(self, points, color: Color) -> None:
        pts = [self._p(x, y) for x, y in points]
        self._d.polygon(pts, fill=color)
        self._dm.polygon(pts, fill=255)

    def line(self, points, color: Color, width: float = 0.06) -> None:
        pts = [self._p(x, y) for x, y in points]
        px = max(1, round(width * self.m))
        self._d.line(pts, fill=color, width=px, joint="curve")
        self._dm.line(pts, fill=255, width=px, joint="curve")


# ----------------------------------------------------------------------------------------------
# One shape grammar per class. Each draws with main colour `c` (from the class palette) and picks
# its own secondary colours and proportions from `r`.


def _aeroplane(p: _Pen, r, c) -> None:
    # top view: fuselage along x, swept wings crossing it, tail plane at the rear
    fy, fh = r.uniform(0.42, 0.58), r.uniform(0.12, 0.2)
    wx, sweep, chord = r.uniform(0.3, 0.45), r.uniform(0.05, 0.2), r.uniform(0.12, 0.22)
    wing = _shade(c, r.uniform(0.75, 0.95))
    p.poly([(wx, fy), (wx + sweep, 0.0), (wx + sweep + chord * 0.5, 0.0), (wx + chord, fy),
            (wx + sweep + chord * 0.5, 1.0), (wx + sweep, 1.0)], wing)
    tail = r.uniform(0.2, 0.3)
    p.poly([(0.82, fy), (0.93, fy - tail), (0.99, fy - tail), (0.96, fy), (0.99, fy + tail),
            (0.93, fy + tail)], wing)
    p.ellipse(0.0, fy - fh / 2, 1.0, fy + fh / 2, c)
    p.ellipse(0.03, fy - fh * 0.25, 0.12, fy + fh * 0.25, _hsv(r, GLASS))


def _aeroplane_side(p: _Pen, r, c) -> None:
    # side view: long body, fin up at the back, one wing below, window dots
    p.poly([(0.8, 0.55), (0.88, 0.05), (0.97, 0.05), (1.0, 0.6)], _shade(c, 0.85))
    p.ellipse(0.0, 0.45, 1.0, 0.8, c)
    p.poly([(0.35, 0.65), (0.55, 0.65), (0.45, 1.0), (0.38, 1.0)], _shade(c, 0.7))
    glass = _hsv(r, GLASS)
    for i in range(int(r.integers(5, 10))):
        x = 0.15 + i * 0.07
        p.rect(x, 0.55, x + 0.03, 0.6, glass)


def _bicycle(p: _Pen, r, c) -> None:
    # two open wheels (rings) joined by a thin diamond frame; the mask has holes inside the wheels
    rad = r.uniform(0.28, 0.34)
    rx = rad * p.h / p.w  # wheel radius as a fraction of the width
    ax, bx, wy = rx, 1 - rx, 1 - rad
    tyre = _hsv(r, DARK)
    p.circle(ax, wy, rad, tyre, ring=r.uniform(0.04, 0.08))
    p.circle(bx, wy, rad, tyre, ring=r.uniform(0.04, 0.08))
    seat = (ax + 0.35 * (bx - ax), r.uniform(0.15, 0.3))
    crank = (ax + 0.45 * (bx - ax), wy)
    head = (bx - 0.12 * (bx - ax), r.uniform(0.1, 0.25))
    width = r.uniform(0.04, 0.07)
    for a, b in [((ax, wy), seat), ((ax, wy), crank), (crank, seat), (seat, head), (crank, head),
                 (head, (bx, wy))]:
        p.line([a, b], c, width)
    p.line([head, (head[0] - 0.06, 0.02)], tyre, width)
    p.line([(seat[0] - 0.06, seat[1] - 0.03), (seat[0] + 0.05, seat[1] - 0.03)], tyre, width * 1.5)


def _bird(p: _Pen, r, c) -> None:
    wing = _shade(c, r.uniform(0.5, 0.8))
    p.poly([(0.2, 0.45), (0.0, r.uniform(0.25, 0.4)), (0.0, r.uniform(0.55, 0.7))], wing)  # tail
    p.ellipse(0.12, 0.3, 0.78, 0.75, c)
    p.ellipse(0.3, 0.38, 0.65, 0.62, wing)
    p.circle(0.78, 0.3, 0.17, c)
    p.poly([(0.86, 0.24), (1.0, 0.32), (0.86, 0.38)], _hsv(r, (30, 55, 0.7, 1, 0.7, 1)))  # beak
    p.circle(0.8, 0.26, 0.03, (10, 10, 10))
    legs = (60, 40, 20)
    p.line([(0.45, 0.72), (0.43, 1.0)], legs, 0.04)
    p.line([(0.55, 0.72), (0.57, 1.0)], legs, 0.04)


def _bird_flying(p: _Pen, r, c) -> None:
    wing = _shade(c, r.uniform(0.6, 0.9))
    tip = r.uniform(0.0, 0.2)
    p.poly([(0.45, 0.6), (0.05, tip), (0.2, tip + 0.1), (0.5, 0.65)], wing)
    p.poly([(0.55, 0.6), (0.95, tip), (0.8, tip + 0.1), (0.5, 0.65)], wing)
    p.ellipse(0.35, 0.52, 0.65, 0.8, c)
    p.circle(0.5, 0.5, 0.12, c)
    p.poly([(0.46, 0.78), (0.5, 1.0), (0.54, 0.78)], wing)


def _boat(p: _Pen, r, c) -> None:
    light = _hsv(r, (0, 360, 0, 0.1, 0.85, 1))
    p.line([(0.45, 0.02), (0.45, 0.66)], (80, 60, 40), 0.04)
    p.poly([(0.48, 0.03), (0.48, 0.62), (r.uniform(0.8, 0.95), 0.62)], light)
    if r.random() < 0.5:
        p.poly([(0.42, 0.1), (0.42, 0.62), (r.uniform(0.12, 0.25), 0.62)], _shade(light, 0.9))
    p.poly([(0.0, 0.64), (1.0, 0.64), (0.86, 0.98), (0.12, 0.98)], c)
    p.rect(0.05, 0.7, 0.95, 0.75, _shade(c, 0.6))


def _motorboat(p: _Pen, r, c) -> None:
    cabin = _hsv(r, (0, 360, 0, 0.1, 0.8, 1))
    p.rect(0.3, 0.25, 0.7, 0.6, cabin)
    glass = _hsv(r, GLASS)
    for x in (0.34, 0.47, 0.6):
        p.rect(x, 0.32, x + 0.07, 0.45, glass)
    p.poly([(0.0, 0.55), (1.0, 0.5), (0.88, 0.95), (0.1, 0.95)], c)
    p.rect(0.08, 0.65, 0.92, 0.7, _shade(c, 1.4))


def _bottle(p: _Pen, r, c) -> None:
    neck = r.uniform(0.3, 0.4)
    p.rrect(0.02, 0.38, 0.98, 1.0, c, 0.2)
    p.poly([(0.02, 0.42), (0.98, 0.42), (1 - neck, 0.2), (neck, 0.2)], c)
    p.rect(neck, 0.04, 1 - neck, 0.22, c)
    p.rect(neck - 0.04, 0.0, 1 - neck + 0.04, 0.06, _any_color(r))  # cap
    y = r.uniform(0.5, 0.65)
    p.rect(0.02, y, 0.98, y + r.uniform(0.12, 0.25), _hsv(r, (0, 360, 0, 0.5, 0.7, 1)))  # label


def _bus(p: _Pen, r, c) -> None:
    p.rrect(0.0, 0.0, 1.0, 0.86, c, 0.12)
    glass = _hsv(r, GLASS)
    n = int(r.integers(4, 8))
    step = 0.8 / n
    for i in range(n):
        x = 0.16 + i * step
        p.rect(x, 0.1, x + step * 0.75, 0.42, glass)
    p.rect(0.04, 0.12, 0.12, 0.8, _shade(glass, 1.2))  # door
    p.rect(0.0, 0.55, 1.0, 0.6, _shade(c, 0.6))
    tyre = _hsv(r, DARK)
    for x in (0.2, 0.8):
        p.circle(x, 0.84, 0.15, tyre)
        p.circle(x, 0.84, 0.06, (150, 150, 150))


def _car(p: _Pen, r, c) -> None:
    top = r.uniform(0.0, 0.12)
    p.poly([(0.18, 0.42), (0.3, top), (0.68, top), (0.84, 0.42)], c)
    p.rrect(0.0, 0.38, 1.0, 0.82, c, 0.3)
    glass = _hsv(r, GLASS)
    p.poly([(0.25, 0.4), (0.33, top + 0.07), (0.48, top + 0.07), (0.48, 0.4)], glass)
    p.poly([(0.52, 0.4), (0.52, top + 0.07), (0.66, top + 0.07), (0.78, 0.4)], glass)
    p.rect(0.94, 0.48, 1.0, 0.56, (250, 240, 200))
    tyre = _hsv(r, DARK)
    for x in (0.2, 0.8):
        p.circle(x, 0.8, 0.2, tyre)
        p.circle(x, 0.8, 0.08, (170, 170, 170))


def _cat(p: _Pen, r, c) -> None:
    leg = _shade(c, 0.9)
    for x in (0.2, 0.3, 0.55, 0.64):
        p.rect(x, 0.62, x + 0.07, 0.98, leg)
    p.line([(0.14, 0.5), (0.04, 0.3), (0.06, r.uniform(0.02, 0.15))], c, 0.08)  # raised tail
    p.ellipse(0.1, 0.35, 0.76, 0.78, c)
    p.circle(0.8, 0.35, 0.24, c)
    p.poly([(0.67, 0.22), (0.7, 0.0), (0.79, 0.16)], c)  # pointed ears
    p.poly([(0.82, 0.16), (0.9, 0.0), (0.94, 0.22)], c)
    eye = _hsv(r, (50, 120, 0.6, 1, 0.6, 1))
    p.circle(0.76, 0.32, 0.035, eye)
    p.circle(0.87, 0.32, 0.035, eye)


def _cat_sitting(p: _Pen, r, c) -> None:
    p.line([(0.7, 0.95), (0.95, 0.9), (0.98, 0.7)], c, 0.1)  # tail curled at the feet
    p.ellipse(0.1, 0.35, 0.85, 1.0, c)
    p.circle(0.48, 0.27, 0.3, c)
    p.poly([(0.25, 0.2), (0.27, 0.0), (0.4, 0.1)], c)
    p.poly([(0.56, 0.1), (0.69, 0.0), (0.71, 0.2)], c)
    eye = _hsv(r, (50, 120, 0.6, 1, 0.6, 1))
    p.circle(0.4, 0.25, 0.04, eye)
    p.circle(0.56, 0.25, 0.04, eye)


def _chair(p: _Pen, r, c) -> None:
    # side view: tall back on one side, seat, two visible legs
    p.rect(0.05, 0.0, 0.2, 0.62, c)
    p.rect(0.05, 0.5, 0.95, 0.62, _shade(c, 1.15))
    p.rect(0.07, 0.6, 0.17, 1.0, _shade(c, 0.8))
    p.rect(0.83, 0.6, 0.93, 1.0, _shade(c, 0.8))
    if r.random() < 0.5:
        p.rect(0.12, 0.8, 0.88, 0.85, _shade(c, 0.7))  # stretcher bar


def _chair_front(p: _Pen, r, c) -> None:
    p.rect(0.12, 0.0, 0.88, 0.08, c)
    n = int(r.integers(2, 5))
    for i in range(n + 1):
        x = 0.12 + i * 0.7 / n
        p.rect(x, 0.0, x + 0.06, 0.5, c)  # back slats
    p.poly([(0.05, 0.5), (0.95, 0.5), (1.0, 0.62), (0.0, 0.62)], _shade(c, 1.15))
    for x in (0.02, 0.2, 0.74, 0.9):
        p.rect(x, 0.6, x + 0.08, 1.0 if x in (0.02, 0.9) else 0.9, _shade(c, 0.8))


def _cow(p: _Pen, r, c) -> None:
    patch = _hsv(r, DARK) if sum(c) > 450 else _shade(c, 0.5)
    leg = _shade(c, 0.9)
    for x in (0.15, 0.27, 0.6, 0.71):
        p.rect(x, 0.55, x + 0.08, 1.0, leg)
        p.rect(x, 0.93, x + 0.08, 1.0, (30, 30, 30))
    p.line([(0.12, 0.25), (0.06, 0.7)], c, 0.04)  # tail
    p.rrect(0.1, 0.18, 0.82, 0.65, c, 0.3)
    for _ in range(int(r.integers(2, 6))):  # irregular patches
        x, y = r.uniform(0.15, 0.7), r.uniform(0.2, 0.5)
        p.ellipse(x, y, x + r.uniform(0.08, 0.2), y + r.uniform(0.1, 0.25), patch)
    p.rrect(0.8, 0.2, 1.0, 0.55, c, 0.3)  # boxy head
    p.ellipse(0.9, 0.42, 1.0, 0.56, (230, 170, 170))  # muzzle
    p.line([(0.82, 0.22), (0.78, 0.08)], (230, 220, 190), 0.04)  # horns
    p.line([(0.96, 0.22), (1.0, 0.08)], (230, 220, 190), 0.04)
    p.ellipse(0.4, 0.6, 0.52, 0.7, (230, 170, 170))  # udder


def _diningtable(p: _Pen, r, c) -> None:
    dark = _shade(c, 0.7)
    for x in (0.17, 0.79):
        p.rect(x, 0.3, x + 0.05, 0.82, _shade(c, 0.55))  # back legs
    p.poly([(0.12, 0.08), (0.88, 0.08), (1.0, 0.35), (0.0, 0.35)], c)
    p.rect(0.0, 0.35, 1.0, 0.45, dark)
    for x in (0.03, 0.91):
        p.rect(x, 0.45, x + 0.06, 1.0, dark)
    if r.random() < 0.3:
        p.rect(0.0, 0.45, 1.0, 0.75, _hsv(r, (0, 360, 0, 0.3, 0.7, 1)))  # table cloth
    for _ in range(int(r.integers(0, 4))):  # plates / cups on top
        x = r.uniform(0.15, 0.75)
        p.ellipse(x, 0.14, x + 0.12, 0.26, _hsv(r, (0, 360, 0, 0.2, 0.8, 1)))


def _dog(p: _Pen, r, c) -> None:
    leg = _shade(c, 0.9)
    for x in (0.2, 0.3, 0.6, 0.69):
        p.rect(x, 0.55, x + 0.07, 1.0, leg)  # longer legs than a cat
    p.line([(0.17, 0.4), (0.02, r.uniform(0.1, 0.3))], c, 0.07)
    p.ellipse(0.14, 0.3, 0.78, 0.66, c)
    p.ellipse(0.66, 0.05, 0.9, 0.4, c)
    p.rrect(0.82, 0.18, 1.0, 0.36, _shade(c, 1.1), 0.4)  # snout
    p.circle(0.97, 0.21, 0.04, (15, 15, 15))
    p.ellipse(0.64, 0.08, 0.74, 0.45, _shade(c, r.uniform(0.4, 0.7)))  # floppy ear
    p.circle(0.8, 0.16, 0.03, (15, 15, 15))


def _horse(p: _Pen, r, c) -> None:
    dark = _shade(c, 0.55)
    for x, lean in ((0.18, -0.03), (0.28, 0.02), (0.6, -0.02), (0.7, 0.03)):
        p.poly([(x, 0.52), (x + 0.07, 0.52), (x + 0.07 + lean, 1.0), (x + lean, 1.0)], c)
        p.rect(x + lean, 0.94, x + 0.07 + lean, 1.0, dark)  # hooves
    p.poly([(0.16, 0.34), (0.1, 0.36), (0.03, 0.75), (0.1, 0.72)], dark)  # hanging tail
    p.ellipse(0.14, 0.28, 0.78, 0.6, c)
    p.poly([(0.62, 0.36), (0.74, 0.46), (0.9, 0.14), (0.8, 0.06)], c)  # neck
    p.poly([(0.78, 0.06), (0.9, 0.0), (1.0, 0.24), (0.93, 0.28)], c)  # long head
    p.line([(0.66, 0.34), (0.8, 0.06)], dark, 0.05)  # mane


def _motorbike(p: _Pen, r, c) -> None:
    rad = r.uniform(0.24, 0.3)
    rx = rad * p.h / p.w
    ax, bx, wy = rx, 1 - rx, 1 - rad
    tyre = _hsv(r, DARK)
    p.line([(bx, wy), (bx - 0.1, 0.12)], (160, 160, 160), 0.06)  # fork
    p.line([(bx - 0.16, 0.08), (bx - 0.04, 0.14)], tyre, 0.06)  # handlebar
    for x in (ax, bx):
        p.circle(x, wy, rad, tyre)  # thick solid tyres, unlike a bicycle's rings
        p.circle(x, wy, rad * 0.4, (150, 150, 150))
    p.poly([(0.28, 0.5), (0.6, 0.3), (0.78, 0.4), (0.62, 0.78), (0.36, 0.78)], c)  # tank + engine
    p.poly([(0.18, 0.38), (0.5, 0.34), (0.5, 0.44), (0.2, 0.46)], tyre)  # seat
    p.line([(0.3, 0.82), (0.05, 0.7)], (180, 180, 180), 0.05)  # exhaust


def _person(p: _Pen, r, c) -> None:
    skin = _hsv(r, SKIN)
    trousers = _hsv(r, (0, 360, 0.1, 0.6, 0.1, 0.5))
    rh = 0.35  # head radius, fraction of the width (the shorter side)
    hy = rh * p.w / p.h
    stride = r.uniform(0.0, 0.2)
    p.poly([(0.28, 0.55), (0.5, 0.55), (0.45 - stride, 1.0), (0.24 - stride, 1.0)], trousers)
    p.poly([(0.5, 0.55), (0.72, 0.55), (0.76 + stride, 1.0), (0.55 + stride, 1.0)], trousers)
    p.rrect(0.18, 2 * hy, 0.82, 0.58, c, 0.2)  # torso
    raise_arm = r.random() < 0.3
    p.line([(0.2, 2 * hy + 0.03), (0.02, 0.05 if raise_arm else 0.5)], c, 0.18)
    p.line([(0.8, 2 * hy + 0.03), (0.98, 0.5)], c, 0.18)
    p.circle(0.5, hy, rh, skin)
    if r.random() < 0.7:
        p.ellipse(0.15, 0.0, 0.85, hy * 0.8, _hsv(r, (0, 50, 0.2, 0.8, 0.05, 0.6)))  # hair


def _pottedplant(p: _Pen, r, c) -> None:
    for _ in range(int(r.integers(2, 5))):
        p.line([(0.5, 0.65), (r.uniform(0.15, 0.85), r.uniform(0.1, 0.4))], _shade(c, 0.6), 0.05)
    for _ in range(int(r.integers(5, 10))):  # leaves
        x, y = r.uniform(0.0, 0.7), r.uniform(0.0, 0.5)
        p.ellipse(x, y, x + r.uniform(0.15, 0.3), y + r.uniform(0.1, 0.22), _shade(c, r.uniform(0.7, 1.2)))
    pot = _hsv(r, (10, 25, 0.5, 0.8, 0.4, 0.8))
    p.poly([(0.22, 0.66), (0.78, 0.66), (0.68, 1.0), (0.32, 1.0)], pot)
    p.rect(0.2, 0.62, 0.8, 0.7, _shade(pot, 1.15))


def _sheep(p: _Pen, r, c) -> None:
    leg = _hsv(r, DARK)
    for x in (0.22, 0.32, 0.58, 0.68):
        p.rect(x, 0.6, x + 0.05, 1.0, leg)
    for _ in range(int(r.integers(8, 14))):  # woolly body: a cloud of circles
        p.circle(r.uniform(0.2, 0.7), r.uniform(0.3, 0.55), r.uniform(0.12, 0.2), _shade(c, r.uniform(0.9, 1.05)))
    p.ellipse(0.74, 0.22, 0.98, 0.52, leg)  # dark face
    p.ellipse(0.7, 0.22, 0.8, 0.32, leg)


def _sofa(p: _Pen, r, c) -> None:
    dark = _shade(c, 0.75)
    p.rect(0.04, 0.86, 0.09, 1.0, (40, 30, 20))
    p.rect(0.91, 0.86, 0.96, 1.0, (40, 30, 20))
    p.rrect(0.04, 0.05, 0.96, 0.55, c, 0.2)  # back
    p.rect(0.0, 0.5, 1.0, 0.87, c)
    n = int(r.integers(2, 4))
    for i in range(1, n):
        x = 0.12 + i * 0.76 / n
        p.line([(x, 0.1), (x, 0.5)], dark, 0.04)  # cushion seams
        p.line([(x, 0.55), (x, 0.75)], dark, 0.04)
    p.rrect(0.0, 0.3, 0.13, 0.87, dark, 0.3)  # arms
    p.rrect(0.87, 0.3, 1.0, 0.87, dark, 0.3)


def _train(p: _Pen, r, c) -> None:
    tyre = _hsv(r, DARK)
    n_axle = int(r.integers(2, 4))
    for i in range(n_axle):
        for base in (0.08, 0.6):
            p.circle(base + i * 0.1, 0.9, 0.09, tyre)
    p.rect(0.0, 0.12, 0.9, 0.86, c)
    p.poly([(0.9, 0.12), (0.95, 0.14), (1.0, 0.55), (1.0, 0.86), (0.9, 0.86)], c)  # sloped nose
    p.poly([(0.92, 0.2), (0.95, 0.2), (0.99, 0.48), (0.92, 0.48)], _hsv(r, GLASS))
    p.rect(0.0, 0.06, 0.9, 0.12, _shade(c, 0.7))  # roof
    glass = _hsv(r, GLASS)
    n = int(r.integers(6, 13))
    step = 0.85 / n
    for i in range(n):
        x = 0.03 + i * step
        p.rect(x, 0.24, x + step * 0.6, 0.44, glass)
    p.rect(0.0, 0.56, 1.0, 0.63, _hsv(r, (0, 360, 0.5, 1, 0.5, 1)))  # livery stripe


def _tvmonitor(p: _Pen, r, c) -> None:
    p.rect(0.44, 0.78, 0.56, 0.93, c)  # stand
    p.rect(0.26, 0.92, 0.74, 1.0, c)
    p.rect(0.0, 0.0, 1.0, 0.8, c)  # frame
    screen = _hsv(r, (0, 360, 0.2, 1, 0.5, 1))
    p.rect(0.06, 0.06, 0.94, 0.74, screen)
    for _ in range(int(r.integers(0, 4))):  # something on screen
        x, y = r.uniform(0.08, 0.7), r.uniform(0.08, 0.5)
        p.rect(x, y, x + r.uniform(0.05, 0.22), y + r.uniform(0.05, 0.2), _any_color(r))


def _tv_crt(p: _Pen, r, c) -> None:
    p.rrect(0.0, 0.0, 1.0, 1.0, c, 0.12)
    screen = _hsv(r, (0, 360, 0.2, 1, 0.4, 1))
    p.rrect(0.06, 0.08, 0.78, 0.9, screen, 0.2)
    for y in (0.2, 0.35, 0.5):
        p.circle(0.89, y, 0.04, _shade(c, 1.6))  # knobs


# class -> (palettes, [(weight, (aspect lo, aspect hi), draw)], max rotation in degrees)
Variant = tuple[float, tuple[float, float], Callable]
CLASS_FAMILIES: dict[str, tuple[list, list[Variant], float]] = {
    "aeroplane": ([(190, 230, 0.0, 0.25, 0.75, 1.0), (0, 360, 0.5, 0.9, 0.5, 0.9)],
                  [(0.6, (0.9, 1.5), _aeroplane), (0.4, (1.8, 2.6), _aeroplane_side)], 20),
    "bicycle": ([(0, 360, 0.5, 1.0, 0.4, 0.95)], [(1.0, (1.5, 1.9), _bicycle)], 5),
    "bird": ([(0, 360, 0.3, 0.9, 0.3, 0.95)],
             [(0.6, (1.0, 1.5), _bird), (0.4, (1.4, 2.0), _bird_flying)], 15),
    "boat": ([(0, 20, 0.6, 0.9, 0.5, 0.9), (200, 240, 0.5, 0.9, 0.4, 0.9), (0, 360, 0, 0.1, 0.85, 1)],
             [(0.6, (0.9, 1.5), _boat), (0.4, (1.6, 2.4), _motorboat)], 8),
    "bottle": ([(90, 150, 0.4, 0.9, 0.25, 0.7), (20, 40, 0.6, 0.9, 0.3, 0.6), (180, 220, 0.1, 0.4, 0.6, 0.9)],
               [(1.0, (0.28, 0.45), _bottle)], 15),
    "bus": ([(35, 60, 0.7, 1.0, 0.8, 1.0), (0, 15, 0.7, 1.0, 0.6, 0.9), (200, 230, 0.5, 0.9, 0.5, 0.9)],
            [(1.0, (1.7, 2.5), _bus)], 3),
    "car": ([(0, 360, 0.4, 1.0, 0.3, 0.95), (0, 360, 0.0, 0.1, 0.1, 0.9)],
            [(1.0, (1.6, 2.3), _car)], 3),
    "cat": ([(15, 40, 0.3, 0.8, 0.4, 0.9), (0, 360, 0.0, 0.1, 0.15, 0.85)],
            [(0.6, (1.1, 1.6), _cat), (0.4, (0.7, 0.95), _cat_sitting)], 5),
    "chair": ([WOOD, (0, 360, 0.2, 0.7, 0.3, 0.8)],
              [(0.5, (0.55, 0.85), _chair), (0.5, (0.6, 0.9), _chair_front)], 3),
    "cow": ([(0, 360, 0.0, 0.08, 0.8, 1.0), (15, 30, 0.5, 0.8, 0.3, 0.6)],
            [(1.0, (1.3, 1.7), _cow)], 3),
    "diningtable": ([WOOD, (0, 360, 0.0, 0.1, 0.6, 0.95)], [(1.0, (1.4, 2.2), _diningtable)], 3),
    "dog": ([(15, 40, 0.3, 0.8, 0.3, 0.85), (0, 360, 0.0, 0.1, 0.1, 0.9)],
            [(1.0, (1.1, 1.6), _dog)], 5),
    "horse": ([(10, 35, 0.4, 0.85, 0.25, 0.7), (0, 360, 0.0, 0.08, 0.2, 0.95)],
              [(1.0, (1.1, 1.45), _horse)], 4),
    "motorbike": ([(0, 360, 0.6, 1.0, 0.4, 0.95)], [(1.0, (1.4, 1.9), _motorbike)], 5),
    "person": ([(0, 360, 0.2, 1.0, 0.2, 1.0)], [(1.0, (0.3, 0.5), _person)], 6),
    "pottedplant": ([(80, 150, 0.4, 0.9, 0.3, 0.8)], [(1.0, (0.55, 0.95), _pottedplant)], 3),
    "sheep": ([(30, 60, 0.05, 0.25, 0.75, 1.0), (0, 360, 0.0, 0.05, 0.25, 0.45)],
              [(1.0, (1.2, 1.6), _sheep)], 4),
    "sofa": ([(0, 360, 0.2, 0.8, 0.3, 0.8)], [(1.0, (1.6, 2.4), _sofa)], 2),
    "train": ([(35, 60, 0.7, 1.0, 0.8, 1.0), (0, 15, 0.7, 1.0, 0.6, 0.9), (200, 230, 0.5, 0.9, 0.5, 0.9),
               (0, 360, 0.0, 0.1, 0.6, 0.95)], [(1.0, (2.2, 3.5), _train)], 3),
    "tvmonitor": ([(0, 360, 0.0, 0.1, 0.05, 0.35), (0, 360, 0.0, 0.05, 0.7, 0.95)],
                  [(0.7, (1.1, 1.5), _tvmonitor), (0.3, (1.0, 1.3), _tv_crt)], 3),
}
assert tuple(CLASS_FAMILIES) == VOC_CLASSES


# ----------------------------------------------------------------------------------------------
# Textures and backgrounds (numpy)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """float32[h, w] noise in about [-1, 1], smooth at the scale of `cells` cells per side."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR)
    return np.clip(np.asarray(img) / 1.5, -1.0, 1.0)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray | None:
    """Multiplicative float32[h, w] brightness pattern for an object, or None (plain)."""
    kind = rng.choice(4, p=[0.4, 0.2, 0.2, 0.2])
    amp = rng.uniform(0.1, 0.35)
    if kind == 0:
        return None
    if kind == 1:  # stripes at a random angle
        theta, period = rng.uniform(0, math.pi), rng.uniform(3.0, 9.0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wave = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * (2 * math.pi / period))
        return 1.0 + amp * np.sign(wave)
    if kind == 2:  # spots: thresholded smooth noise
        spots = _smooth_noise(rng, h, w, int(rng.integers(3, 7))) > 0.35
        return 1.0 - 1.5 * amp * spots
    return 1.0 + amp * _smooth_noise(rng, h, w, int(rng.integers(4, 10)))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Gradient + smooth noise + random clutter primitives."""
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    t = (xx * math.cos(theta) + yy * math.sin(theta))
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
    arr += 25.0 * _smooth_noise(rng, size, size, 6)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 9))):
        color = _any_color(rng)
        x, y = rng.uniform(-0.1, 1.0, 2) * size
        s = rng.uniform(0.05, 0.35) * size
        kind = rng.integers(5)
        if kind == 0:
            x2, y2 = rng.uniform(0, 1, 2) * size
            draw.line([x, y, x2, y2], fill=color, width=int(rng.integers(1, max(2, size // 30))))
        elif kind == 1:
            draw.ellipse([x, y, x + s, y + s * rng.uniform(0.4, 1.6)], fill=color)
        elif kind == 2:
            draw.rectangle([x, y, x + s, y + s * rng.uniform(0.3, 1.5)], fill=color)
        elif kind == 3:
            pts = [(x + dx * s, y + dy * s) for dx, dy in rng.uniform(0, 1, (int(rng.integers(3, 6)), 2))]
            draw.polygon(pts, fill=color)
        else:
            draw.ellipse([x, y, x + s, y + s], outline=color, width=max(1, size // 40))
    return img


# ----------------------------------------------------------------------------------------------
# One image


def _draw_object(rng: np.random.Generator, name: str, long_side: float) -> tuple[Image.Image, Image.Image]:
    """Render one object: (RGB sprite, L mask) of about `long_side` pixels on its longer side."""
    palettes, variants, max_rot = CLASS_FAMILIES[name]
    weights = np.array([v[0] for v in variants])
    _, (a0, a1), draw = variants[int(rng.choice(len(variants), p=weights / weights.sum()))]
    aspect = rng.uniform(a0, a1)
    if aspect >= 1:
        w, h = long_side, long_side / aspect
    else:
        w, h = long_side * aspect, long_side
    w, h = max(4, round(w)), max(4, round(h))

    pen = _Pen(w, h)
    color = _hsv(rng, palettes[int(rng.integers(len(palettes)))])
    draw(pen, rng, color)
    sprite, mask = pen.rgb, pen.mask

    pattern = _texture(rng, h, w)
    if pattern is not None:
        arr = np.asarray(sprite, dtype=np.float32) * pattern[..., None]
        sprite = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        sprite, mask = ImageOps.mirror(sprite), ImageOps.mirror(mask)
    angle = rng.uniform(-max_rot, max_rot)
    if abs(angle) > 1.0:
        sprite = sprite.rotate(angle, resample=Image.BILINEAR, expand=True)
        mask = mask.rotate(angle, resample=Image.NEAREST, expand=True)
    return sprite, mask


def render_image(index: int, seed: int, size: int, classes: Sequence[str]) -> tuple[Image.Image, list[dict]]:
    """Draw image `index`: (RGB image size x size, objects as dicts for the XML).

    Object dicts hold name, 1-based inclusive box (xmin, ymin, xmax, ymax), difficult, truncated,
    occluded. At least one object always survives (the layout is redrawn otherwise).
    """
    rng = np.random.default_rng([seed, index])
    for _ in range(20):
        image, objects = _try_layout(rng, size, classes)
        if objects:
            return image, objects
    raise RuntimeError(f"could not lay out synthetic image {index} (seed {seed})")  # pragma: no cover


def _try_layout(rng: np.random.Generator, size: int, classes: Sequence[str]) -> tuple[Image.Image, list[dict]]:
    primary = classes[int(rng.integers(len(classes)))]
    secondary = None
    if len(classes) > 1 and rng.random() < 0.45:
        others = [c for c in classes if c != primary]
        secondary = others[int(rng.integers(len(others)))]
    n = int(rng.choice(4, p=[0.35, 0.3, 0.2, 0.15])) + 1
    names = [primary]
    if secondary is not None and n >= 2:
        names.append(secondary)
    while len(names) < n:
        names.append(primary if secondary is None or rng.random() < 0.6 else secondary)
    rng.shuffle(names)  # paint order: later objects occlude earlier ones

    canvas = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)  # which object owns each visible pixel
    shrink = 1.0 if n <= 2 else 0.85
    full_area, in_image, placed = [], [], []
    centres: list[tuple[float, float, float]] = []
    for i, name in enumerate(names):
        long_side = size * shrink * math.exp(rng.uniform(math.log(0.25), math.log(0.8)))
        sprite, mask = _draw_object(rng, name, long_side)
        w, h = sprite.size
        if centres and rng.random() < 0.5:
            # next to an earlier object, so that objects overlap and occlude
            cx, cy, s = centres[int(rng.integers(len(centres)))]
            cx, cy = cx + rng.uniform(-0.6, 0.6) * s, cy + rng.uniform(-0.6, 0.6) * s
        else:
            cx, cy = rng.uniform(0.1, 0.9, 2) * size
        x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
        centres.append((cx, cy, max(w, h)))
        canvas.paste(sprite, (x0, y0), mask)

        m = np.asarray(mask) > 127
        full_area.append(int(m.sum()))
        xa, ya, xb, yb = max(0, x0), max(0, y0), min(size, x0 + w), min(size, y0 + h)
        if xa < xb and ya < yb:
            sub = m[ya - y0:yb - y0, xa - x0:xb - x0]
            owner[ya:yb, xa:xb][sub] = i
            in_image.append(int(sub.sum()))
        else:
            in_image.append(0)
        placed.append(name)

    if rng.random() < 0.25:  # foreground poles / branches occluding whatever is behind them
        poles = Image.new("L", (size, size), 0)
        dp, dc = ImageDraw.Draw(poles), ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 3))):
            pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
            width = max(1, int(rng.uniform(0.02, 0.05) * size))
            color = _any_color(rng)
            dc.line(pts, fill=color, width=width)
            dp.line(pts, fill=255, width=width)
        owner[np.asarray(poles) > 127] = -2

    objects = []
    for i, name in enumerate(placed):
        visible = owner == i
        count = int(visible.sum())
        if full_area[i] == 0 or count < 10 or count < 0.1 * full_area[i]:
            continue  # (almost) hidden: not annotated
        cols = np.flatnonzero(visible.any(axis=0))
        rows = np.flatnonzero(visible.any(axis=1))
        xmin, xmax, ymin, ymax = int(cols[0]) + 1, int(cols[-1]) + 1, int(rows[0]) + 1, int(rows[-1]) + 1
        frac = count / full_area[i]
        tiny = math.sqrt((xmax - xmin + 1) * (ymax - ymin + 1)) < 0.08 * size
        objects.append({
            "name": name,
            "box": (xmin, ymin, xmax, ymax),
            "difficult": frac < 0.35 or tiny,
            "truncated": in_image[i] < full_area[i],
            "occluded": count < in_image[i],
        })

    # camera: contrast/brightness jitter and sensor noise
    arr = np.asarray(canvas, dtype=np.float32)
    arr = (arr - 128.0) * rng.uniform(0.75, 1.15) + 128.0 + rng.uniform(-20, 20)
    arr += rng.normal(0.0, rng.uniform(2.0, 8.0), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), objects


def annotation_xml(image_id: str, filename: str, size: int, objects: list[dict]) -> str:
    """VOC XML text for one image (fixed formatting, so identical input gives identical bytes)."""
    lines = [
        "<annotation>",
        "  <folder>synthetic</folder>",
        f"  <filename>{filename}</filename>",
        "  <source><database>DiReDi synthetic VOC</database></source>",
        f"  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
        "  <segmented>0</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj["box"]
        lines += [
            "  <object>",
            f"    <name>{obj['name']}</name>",
            "    <pose>Unspecified</pose>",
            f"    <truncated>{int(obj['truncated'])}</truncated>",
            f"    <occluded>{int(obj['occluded'])}</occluded>",
            f"    <difficult>{int(obj['difficult'])}</difficult>",
            f"    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>",
            "  </object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Writing the data set


def synth_key(num_images: int, image_size: int, seed: int, classes: Sequence[str] | None = None) -> str:
    """Hash of everything that decides the generated bytes (the cache key)."""
    params = {
        "version": GENERATOR_VERSION,
        "num_images": int(num_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "classes": list(VOC_CLASSES if classes is None else classes),
        "jpeg_quality": JPEG_QUALITY,
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def write_synthetic_voc(
    root: str | Path,
    num_images: int,
    image_size: int,
    seed: int,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write the synthetic data set to `root` in VOC layout and return `root`.

    Writes ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml``, ``ImageSets/Main/trainval.txt`` and
    last a ``.complete`` marker holding the parameter hash. If the marker already matches, nothing is
    done; a partial or mismatched folder is regenerated (only these three folders and the marker
    are replaced). `classes` (default: all 20 VOC classes) restricts which families are drawn.
    """
    root = Path(root)
    if num_images < 1 or image_size < 16:
        raise DataError(f"synthetic VOC at {root}: need num_images >= 1 and image_size >= 16, "
                        f"got {num_images} and {image_size}")
    class_list = list(VOC_CLASSES if classes is None else classes)
    check_class_names(class_list, "write_synthetic_voc(classes=...)")
    if not class_list:
        raise DataError(f"synthetic VOC at {root}: the class list is empty")
    key = synth_key(num_images, image_size, seed, class_list)
    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == key:
        return root

    # Build in a scratch folder next to the final one, then move into place: a crash leaves no
    # half-written set behind a valid-looking marker.
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    scratch = root / f".partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "JPEGImages").mkdir(parents=True)
    (scratch / "Annotations").mkdir()
    (scratch / "ImageSets" / "Main").mkdir(parents=True)

    ids = [f"{i:06d}" for i in range(num_images)]
    for i, image_id in enumerate(ids):
        image, objects = render_image(i, seed, image_size, class_list)
        image.save(scratch / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY)
        xml = annotation_xml(image_id, f"{image_id}.jpg", image_size, objects)
        (scratch / "Annotations" / f"{image_id}.xml").write_text(xml)
    (scratch / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")

    for sub in ("JPEGImages", "Annotations", "ImageSets"):
        shutil.rmtree(root / sub, ignore_errors=True)
        os.replace(scratch / sub, root / sub)
    shutil.rmtree(scratch, ignore_errors=True)
    tmp_marker = root / f".complete.{os.getpid()}"
    tmp_marker.write_text(key + "\n")
    os.replace(tmp_marker, marker)
    return root


def ensure_synthetic_voc(
    cache_dir: str | Path,
    profile_name: str,
    num_images: int,
    image_size: int,
    seed: int,
    classes: Sequence[str] | None = None,
) -> Path:
    """Generate once and reuse: returns ``cache_dir/synth-<hash>`` holding the data set.

    The hash covers the generator parameters only, so profiles asking for the same data share one
    folder; `profile_name` is recorded in an info file for people browsing the cache.
    """
    key = synth_key(num_images, image_size, seed, classes)
    root = Path(cache_dir) / f"synth-{key[:12]}"
    write_synthetic_voc(root, num_images, image_size, seed, classes)
    info = root / "info.json"
    if not info.exists():
        info.write_text(json.dumps({
            "profile": profile_name, "num_images": num_images, "image_size": image_size,
            "seed": seed, "classes": list(VOC_CLASSES if classes is None else classes),
        }, indent=1) + "\n")
    return root
