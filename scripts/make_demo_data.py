"""Write a small synthetic dataset in the exact SAR-RARP50 release layout, for tests and demos.

    python scripts/make_demo_data.py --output demo_sarrarp [--train-videos 5 --test-videos 2
        --seconds 4 --width 384 --height 216 --seed 0 --overwrite]

Layout (as in the release, see /work/shared/SARRARP50.md):

    OUT/train/video_01/video_left.avi            60 fps, XVID (an inter-frame codec)
    OUT/train/video_01/segmentation/000000000.png, 000000060.png, ...   uint8 class ids
    OUT/train/video_01/action_continuous.txt, action_discrete.txt       placeholders
    OUT/train/video_04_1/, video_04_2/           the second-to-last train video comes in two parts
    OUT/test/video_41/ ...

Frames show a panning reddish tissue texture with surgical-looking objects (robotic tools made
of shaft 3 / wrist 2 / clasper 1, suction tool 6, needle holder 7, clamps 8, catheter 9, a thin
thread 5 and a thin needle 4) that move smoothly, so consecutive frames differ. Every frame is
rendered together with its mask from the same scene state: each part is first drawn as a
shape, and only the shape's pixels change in both the image and the mask, so they agree
exactly. Output is deterministic for a seed (mask bytes; decoded video frames).
"""

import argparse
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import progress_bars  # noqa: E402

FPS = 60
FRAMES_PER_MASK = 60  # one mask per second, as in the release
FIRST_TEST_VIDEO = 41
MAX_TRAIN_VIDEOS = 40  # train videos 1-40, test from 41
MIN_SIZE = 32
SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel smooth motion
ONE = 1 << SHIFT

# Class ids, as dataset.CLASS_NAMES (not imported: that module pulls in torch).
CLASPER, WRIST, SHAFT, NEEDLE, THREAD, SUCTION, NEEDLE_HOLDER, CLAMPS, CATHETER = range(1, 10)
EXTRA_CLASSES = (THREAD, NEEDLE, SUCTION, CATHETER, NEEDLE_HOLDER, CLAMPS)  # beside the tool's 1-3

# Looks (BGR): (edge, base, highlight). Hues kept apart so a tiny model learns them quickly.
LOOKS = {
    SHAFT: ((22, 22, 26), (52, 52, 58), (105, 105, 112)),  # dark grey
    WRIST: ((95, 105, 80), (140, 152, 118), (200, 210, 185)),  # grey with a green tint
    CLASPER: ((150, 150, 158), (205, 205, 212), (252, 252, 252)),  # bright silver
    NEEDLE: ((190, 190, 196), (228, 228, 232), (255, 255, 255)),  # silver-white, thin
    THREAD: ((130, 120, 20), (165, 150, 35), (200, 190, 90)),  # blue-green suture
    SUCTION: ((95, 120, 135), (140, 176, 192), (205, 228, 240)),  # warm brushed metal
    NEEDLE_HOLDER: ((120, 85, 55), (172, 128, 92), (225, 195, 165)),  # steel blue
    CLAMPS: ((70, 15, 70), (125, 45, 115), (185, 120, 180)),  # purple polymer clip
    CATHETER: ((120, 175, 195), (165, 218, 238), (235, 250, 255)),  # yellowish-white tube
}


class DemoDataError(ValueError):
    """Bad arguments or output folder; the message is one line."""


# ----------------------------------------------------------------------------- geometry helpers


def unit(v):
    v = np.asarray(v, float)
    return v / max(float(np.hypot(*v)), 1e-9)


def normal(d):
    return np.array([-d[1], d[0]])


def rotate(d, angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])


def wave(t, amp, period, phase):
    return amp * math.sin(2 * math.pi * t / period + phase)


def segment_quad(a, b, half_width):
    """Rectangle of the given half width around segment a-b (flat ends)."""
    n = normal(unit(np.subtract(b, a))) * half_width
    return np.array([a + n, b + n, b - n, a - n])


def bezier(points, count):
    """Points on the Bezier curve with the given control points."""
    t = np.linspace(0, 1, count)[:, None]
    p = [np.asarray(q, float) for q in points]
    while len(p) > 1:  # de Casteljau
        p = [(1 - t) * p[i] + t * p[i + 1] for i in range(len(p) - 1)]
    return p[0]


def arc(centre, radius, start, stop, count=24):
    angles = np.linspace(start, stop, count)
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], axis=1)


# ----------------------------------------------------------------------------- parts and painting


@dataclass
class Part:
    """One class-labelled piece. shape: ops drawn as the part's pixels; look: (op, colour) pairs
    painted onto a copy of the frame and kept only inside the shape.
    An op is ("poly", points) or ("line", points, thickness in px)."""

    class_id: int
    shape: list
    look: list = field(default_factory=list)


def fixed(points, origin):
    return np.round((np.asarray(points, float) - origin) * ONE).astype(np.int32).reshape(-1, 1, 2)


def draw_op(image, op, colour, origin):
    if op[0] == "poly":
        cv2.fillPoly(image, [fixed(op[1], origin)], colour, cv2.LINE_8, SHIFT)
    else:
        cv2.polylines(image, [fixed(op[1], origin)], False, colour, max(1, int(round(op[2]))), cv2.LINE_8, SHIFT)


def op_bounds(op):
    pts = np.asarray(op[1], float).reshape(-1, 2)
    pad = op[2] / 2 + 1 if op[0] == "line" else 1
    return pts.min(0) - pad, pts.max(0) + pad


def paint(frame, mask, part):
    """Draw part into frame and mask; only pixels of its shape change, in both."""
    height, width = mask.shape
    bounds = [op_bounds(op) for op in part.shape]
    low = np.min([b[0] for b in bounds], axis=0)
    high = np.max([b[1] for b in bounds], axis=0)
    x0, y0 = max(int(low[0]) - 2, 0), max(int(low[1]) - 2, 0)
    x1, y1 = min(int(high[0]) + 3, width), min(int(high[1]) + 3, height)
    if x0 >= x1 or y0 >= y1:
        return
    origin = np.array([x0, y0], float)
    layer = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for op in part.shape:
        draw_op(layer, op, 255, origin)
    inside = layer.astype(bool)
    if not inside.any():
        return
    frame_roi, mask_roi = frame[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    patch = frame_roi.copy()
    for op, colour in part.look:
        draw_op(patch, op, colour, origin)
    np.copyto(frame_roi, patch, where=inside[..., None])
    mask_roi[inside] = part.class_id


def tube_look(points, thickness, class_id, light):
    """Cylinder-like shading of a stroke: dark rim, base, offset highlight."""
    edge, base, high = LOOKS[class_id]
    pts = np.asarray(points, float)
    if thickness < 4:
        return [(("line", pts, thickness), base)]
    return [
        (("line", pts, thickness + 2), edge),
        (("line", pts, thickness * 0.65), base),
        (("line", pts + light * thickness * 0.18, thickness * 0.22), high),
    ]


def quad_look(a, b, half_width, class_id, light):
    """Shading of a straight rigid piece a-b: edge fill, base core, highlight along the axis."""
    edge, base, high = LOOKS[class_id]
    return [
        (("poly", segment_quad(a, b, half_width * 1.3)), edge),
        (("poly", segment_quad(a, b, half_width * 0.7)), base),
        (("line", np.array([a, b]) + light * half_width * 0.3, max(1.0, half_width * 0.3)), high),
    ]


# ----------------------------------------------------------------------------- scene objects


class Tool:
    """Robotic tool pivoting about a port outside the image: shaft (3), wrist (2), two jaws (1)."""

    def __init__(self, rng, width, height, side, scale):
        self.entry = np.array([-0.15 * width if side < 0 else 1.15 * width, rng.uniform(0.45, 1.3) * height])
        cx = rng.uniform(0.3, 0.5) if side < 0 else rng.uniform(0.5, 0.7)
        self.centre = np.array([cx * width, rng.uniform(0.3, 0.65) * height])
        self.amp = np.array([0.12 * width, 0.12 * height]) * rng.uniform(0.6, 1.2)
        self.periods = rng.uniform(1.8, 4.5, 4)
        self.phases = rng.uniform(0, 2 * math.pi, 4)
        self.half_width = max(1.5, 0.04 * height * scale)

    def pose(self, t):
        tip = self.centre + np.array(
            [
                wave(t, self.amp[0], self.periods[0], self.phases[0]),
                wave(t, self.amp[1], self.periods[1], self.phases[1]),
            ]
        )
        d = unit(tip - self.entry)
        bend = wave(t, 0.45, self.periods[2], self.phases[2])
        opening = 0.08 + 0.32 * (0.5 + 0.5 * math.sin(2 * math.pi * t / self.periods[3] + self.phases[3]))
        d2 = rotate(d, bend)
        wrist_end = tip + d2 * 2.0 * self.half_width
        return tip, d, d2, wrist_end, opening

    def grip(self, t):
        """Point between the jaws and the jaw direction (for a held needle or thread)."""
        _, _, d2, q, _ = self.pose(t)
        return q + d2 * 1.4 * self.half_width, d2

    def parts(self, t, light):
        hw = self.half_width
        tip, d, d2, q, opening = self.pose(t)
        parts = [
            Part(SHAFT, [("poly", segment_quad(self.entry, tip, hw))], quad_look(self.entry, tip, hw, SHAFT, light))
        ]
        edge, base, high = LOOKS[WRIST]
        wrist_shape = [("poly", segment_quad(tip, q, 0.9 * hw)), ("line", np.array([tip, tip]), 1.8 * hw)]
        parts.append(
            Part(
                WRIST,
                wrist_shape,
                [
                    (("poly", segment_quad(tip, q, 1.2 * hw)), edge),
                    (("line", np.array([tip, tip]), 2.2 * hw), edge),
                    (("poly", segment_quad(tip, q, 0.55 * hw)), base),
                    (("line", np.array([tip, q]) + light * 0.3 * hw, max(1.0, 0.3 * hw)), high),
                ],
            )
        )
        jaws, look = [], []
        length = 2.6 * hw
        for sign in (-1, 1):
            dj = rotate(d2, sign * opening)
            nj = normal(dj)
            jaw = np.array(
                [
                    q + nj * 0.4 * hw,
                    q + dj * length + nj * 0.12 * hw,
                    q + dj * length - nj * 0.12 * hw,
                    q - nj * 0.4 * hw,
                ]
            )
            jaws.append(("poly", jaw))
            look += [
                (("poly", jaw), LOOKS[CLASPER][0]),
                (
                    ("line", np.array([q, q + dj * length * 0.85]) + light * 0.1 * hw, max(1.0, 0.35 * hw)),
                    LOOKS[CLASPER][1],
                ),
                (("line", np.array([q, q + dj * length * 0.6]) + light * 0.2 * hw, 1), LOOKS[CLASPER][2]),
            ]
        parts.append(Part(CLASPER, jaws, look))
        return parts


class StraightInstrument:
    """Suction tool (6) or laparoscopic needle holder (7): a rigid tube from the border."""

    def __init__(self, rng, width, height, class_id):
        self.class_id = class_id
        side = rng.integers(3)
        if side == 0:
            self.entry = np.array([rng.uniform(0.2, 0.8) * width, -0.2 * height])
        else:
            self.entry = np.array([-0.2 * width if side == 1 else 1.2 * width, rng.uniform(-0.1, 0.4) * height])
        self.centre = np.array([rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height])
        self.amp = np.array([0.08 * width, 0.08 * height]) * rng.uniform(0.5, 1.2)
        self.periods = rng.uniform(2.0, 5.0, 3)
        self.phases = rng.uniform(0, 2 * math.pi, 3)
        factor = 0.028 if class_id == SUCTION else 0.02
        self.half_width = max(1.2, factor * height * rng.uniform(0.85, 1.15))

    def parts(self, t, light):
        tip = self.centre + np.array(
            [
                wave(t, self.amp[0], self.periods[0], self.phases[0]),
                wave(t, self.amp[1], self.periods[1], self.phases[1]),
            ]
        )
        hw = self.half_width
        d = unit(tip - self.entry)
        if self.class_id == SUCTION:
            shape = [("poly", segment_quad(self.entry, tip, hw))]
            look = quad_look(self.entry, tip, hw, SUCTION, light)
            ring = tip - d * 1.2 * hw  # darker perforated end
            look.append((("poly", segment_quad(ring, tip, hw * 1.5)), LOOKS[SUCTION][0]))
            return [Part(SUCTION, shape, look)]
        # needle holder: thin shaft, then two short jaws opening and closing
        shape = [("poly", segment_quad(self.entry, tip, hw))]
        look = quad_look(self.entry, tip, hw, NEEDLE_HOLDER, light)
        opening = 0.05 + 0.25 * (0.5 + 0.5 * math.sin(2 * math.pi * t / self.periods[2] + self.phases[2]))
        for sign in (-1, 1):
            dj = rotate(d, sign * opening)
            nj = normal(dj)
            jaw = np.array(
                [tip + nj * hw, tip + dj * 4 * hw + nj * 0.3 * hw, tip + dj * 4 * hw - nj * 0.3 * hw, tip - nj * hw]
            )
            shape.append(("poly", jaw))
            look += [
                (("poly", jaw), LOOKS[NEEDLE_HOLDER][1]),
                (("line", np.array([tip, tip + dj * 3.5 * hw]), 1), LOOKS[NEEDLE_HOLDER][2]),
            ]
        return [Part(NEEDLE_HOLDER, shape, look)]


class Catheter:
    """Flexible yellowish tube (9) entering from the bottom border, gently swaying."""

    def __init__(self, rng, width, height):
        x = rng.uniform(0.15, 0.85) * width
        self.controls = np.array(
            [
                [x, 1.2 * height],
                [x + rng.uniform(-0.3, 0.3) * width, rng.uniform(0.6, 0.9) * height],
                [rng.uniform(0.2, 0.8) * width, rng.uniform(0.5, 0.8) * height],
                [rng.uniform(0.25, 0.75) * width, rng.uniform(0.35, 0.6) * height],
            ]
        )
        self.amp = 0.06 * min(width, height)
        self.periods = rng.uniform(2.5, 6.0, 3)
        self.phases = rng.uniform(0, 2 * math.pi, 3)
        self.thickness = max(3.0, 0.06 * height * rng.uniform(0.8, 1.2))

    def parts(self, t, light):
        c = self.controls.copy()
        for k in range(1, 4):
            c[k] += [
                wave(t, self.amp, self.periods[k - 1], self.phases[k - 1]),
                wave(t, self.amp, self.periods[k - 1] * 1.3, self.phases[k - 1] + 1),
            ]
        pts = bezier(c, 32)
        return [Part(CATHETER, [("line", pts, self.thickness)], tube_look(pts, self.thickness, CATHETER, light))]


class Clamps:
    """1-3 purple polymer clips (8) fixed on the tissue: they move with the tissue pan."""

    def __init__(self, rng, width, height, pan_at_zero):
        count = int(rng.integers(1, 4))
        self.positions = pan_at_zero + np.stack(
            [rng.uniform(0.2, 0.8, count) * width, rng.uniform(0.25, 0.8, count) * height], axis=1
        )
        self.angles = rng.uniform(0, 2 * math.pi, count)
        self.size = max(4.0, 0.07 * height)

    def parts(self, t, light, pan):
        parts = []
        for position, angle in zip(self.positions - pan, self.angles):
            d = np.array([math.cos(angle), math.sin(angle)])
            hinge = position - d * self.size / 2
            shape, look = [], []
            for sign in (-1, 1):
                arm_end = hinge + rotate(d, sign * 0.22) * self.size
                quad = segment_quad(hinge, arm_end, max(1.0, 0.13 * self.size))
                shape.append(("poly", quad))
                look += [
                    (("poly", quad), LOOKS[CLAMPS][1]),
                    (("line", np.array([hinge, arm_end]) + light * 0.05 * self.size, 1), LOOKS[CLAMPS][2]),
                ]
            knob = ("line", np.array([hinge, hinge]), max(2.0, 0.3 * self.size))
            shape.append(knob)
            look.append((knob, LOOKS[CLAMPS][0]))
            parts.append(Part(CLAMPS, shape, look))
        return parts


class Needle:
    """Thin curved suturing needle (4) held in the jaws of a tool (drawn on top of it)."""

    def __init__(self, rng, height, tool):
        self.tool = tool
        self.radius = max(4.0, 0.085 * height * rng.uniform(0.85, 1.15))
        self.thickness = 1 if height < 150 else 2
        self.sweep = rng.uniform(0.45, 0.6) * 2 * math.pi  # a 3/8 to 1/2 circle
        self.turn = rng.uniform(0.2, 0.5)
        self.flip = rng.choice([-1.0, 1.0])

    def points(self, t):
        grip, d2 = self.tool.grip(t)
        centre = grip + normal(d2) * self.radius * self.flip
        start = math.atan2(grip[1] - centre[1], grip[0] - centre[0]) - self.sweep * self.turn
        return arc(centre, self.radius, start, start + self.sweep)

    def parts(self, t, light):
        pts = self.points(t)
        edge, base, high = LOOKS[NEEDLE]
        return [
            Part(
                NEEDLE,
                [("line", pts, self.thickness)],
                [(("line", pts, self.thickness), base), (("line", pts[4:12], 1), high)],
            )
        ]


class Thread:
    """Suture thread (5): a 1-3 px curvy line from a tissue anchor to the needle or the jaws."""

    def __init__(self, rng, width, height, tool, needle, pan_at_zero):
        self.tool, self.needle = tool, needle
        self.anchor = pan_at_zero + np.array([rng.uniform(0.15, 0.85) * width, rng.uniform(0.2, 0.85) * height])
        self.bulge = rng.uniform(-0.3, 0.3, 2) * min(width, height)
        self.wiggle = rng.uniform(0.01, 0.025) * min(width, height)
        self.waves = rng.uniform(1.5, 3.5)
        self.periods = rng.uniform(1.5, 4.0, 2)
        self.phases = rng.uniform(0, 2 * math.pi, 3)
        self.thickness = int(rng.integers(1, 3)) + (1 if height >= 180 else 0)

    def parts(self, t, light, pan):
        if self.needle is not None:
            end = self.needle.points(t)[-1]
        else:
            end = self.tool.grip(t)[0]
        start = self.anchor - pan
        chord = end - start
        n = normal(unit(chord))
        sway = np.array(
            [wave(t, 0.15, self.periods[0], self.phases[0]), wave(t, 0.15, self.periods[1], self.phases[1])]
        ) * np.hypot(*chord)
        c1 = start + chord / 3 + n * self.bulge[0] + sway
        c2 = start + 2 * chord / 3 + n * self.bulge[1] - sway * 0.5
        pts = bezier([start, c1, c2, end], 48)
        s = np.linspace(0, 1, len(pts))
        pts = (
            pts
            + n
            * (self.wiggle * np.sin(2 * math.pi * (self.waves * s + t / 2.0) + self.phases[2]) * np.sin(math.pi * s))[
                :, None
            ]
        )
        edge, base, high = LOOKS[THREAD]
        return [Part(THREAD, [("line", pts, self.thickness)], [(("line", pts, self.thickness), base)])]


# ----------------------------------------------------------------------------- tissue


def smooth_noise(rng, height, width, cell):
    """Low-frequency noise: a coarse random grid resized with cubic interpolation."""
    cell = max(2, int(cell))
    small = rng.random((height // cell + 3, width // cell + 3)).astype(np.float32)
    big = cv2.resize(small, ((width // cell + 3) * cell, (height // cell + 3) * cell), interpolation=cv2.INTER_CUBIC)
    return big[cell : cell + height, cell : cell + width]


def fractal_noise(rng, height, width, cells, weights):
    total = sum(w * smooth_noise(rng, height, width, c) for c, w in zip(cells, weights))
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def tissue_texture(rng, height, width, scale):
    """A reddish/pink tissue canvas with fat patches, vessels and specular highlights (BGR uint8)."""
    base = fractal_noise(
        rng, height, width, [0.5 * scale, 0.2 * scale, 0.07 * scale, 0.025 * scale], [1.0, 0.5, 0.25, 0.12]
    )
    fat = fractal_noise(rng, height, width, [0.35 * scale, 0.12 * scale], [1.0, 0.4])
    fat = np.clip((fat - 0.68) / 0.15, 0, 1)[..., None] * 0.7
    dark, pink, yellow = (np.array(c, np.float32) for c in ((30, 32, 115), (120, 128, 218), (125, 200, 235)))
    image = dark + (pink - dark) * base[..., None]
    image = image * (1 - fat) + yellow * fat
    vessels = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(4, 9))):
        steps = rng.normal(0, 0.35, 40).cumsum() + rng.uniform(0, 2 * math.pi)
        step = 0.02 * scale
        pts = np.stack([np.cos(steps), np.sin(steps)], axis=1).cumsum(0) * step
        pts += [rng.uniform(0, width), rng.uniform(0, height)]
        cv2.polylines(
            vessels,
            [np.round(pts * ONE).astype(np.int32)],
            False,
            1.0,
            max(1, int(round(rng.uniform(0.004, 0.012) * scale))),
            cv2.LINE_AA,
            SHIFT,
        )
    vessels = cv2.GaussianBlur(vessels, (0, 0), max(0.6, 0.003 * scale))[..., None] * 0.55
    image = image * (1 - vessels) + np.array([55, 25, 95], np.float32) * vessels
    glints = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(6, 14))):
        centre = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        axes = (max(1, int(rng.uniform(0.004, 0.02) * scale)), max(1, int(rng.uniform(0.002, 0.008) * scale)))
        cv2.ellipse(glints, centre, axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
    glints = np.clip(cv2.GaussianBlur(glints, (0, 0), max(0.7, 0.003 * scale)) * 1.4, 0, 1)[..., None]
    image = image + (245 - image) * glints
    image += rng.normal(0, 5, (height, width, 1)).astype(np.float32)  # fine grain, moves with the tissue
    return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- one video


class Scene:
    """Everything of one operation; frame(t) renders image and mask for time t (seconds)."""

    def __init__(self, rng, width, height, extras):
        self.width, self.height = width, height
        self.pad = np.array([int(0.09 * width) + 2, int(0.09 * height) + 2])
        self.pan_amp = (self.pad - 2) * rng.uniform(0.6, 1.0)
        self.pan_periods = rng.uniform(3.0, 7.0, 2)
        self.pan_phases = rng.uniform(0, 2 * math.pi, 2)
        scale = max(width, height)
        self.texture = tissue_texture(rng, height + 2 * self.pad[1], width + 2 * self.pad[0], scale)
        self.light = unit([-1.0, -1.0]) * rng.choice([-1.0, 1.0])
        pan0 = self.pan(0.0).astype(float)
        mirror = rng.choice([-1, 1])
        tools = [
            Tool(rng, width, height, mirror * side, rng.uniform(0.85, 1.15))
            for side in ((-1, 1) if rng.random() < 0.6 else (-1,))
        ]
        self.back, self.middle, self.front = [], [], []  # z-order: tissue-bound, instruments, needle
        if CLAMPS in extras:
            self.back.append(Clamps(rng, width, height, pan0))
        if CATHETER in extras:
            self.middle.append(Catheter(rng, width, height))
        needle = Needle(rng, height, tools[0]) if NEEDLE in extras else None
        if THREAD in extras:
            self.back.append(Thread(rng, width, height, tools[0], needle, pan0))
        for class_id in (SUCTION, NEEDLE_HOLDER):
            if class_id in extras:
                self.middle.append(StraightInstrument(rng, width, height, class_id))
        self.middle += tools
        if needle is not None:
            self.front.append(needle)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        r2 = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2
        vignette = np.round(255 * (1.0 - 0.28 * r2)).astype(np.uint8)
        self.vignette = cv2.merge([vignette] * 3)
        self.noise = []  # sensor noise as (positive, negative) uint8 pairs: saturating cv2 adds are fast
        for _ in range(6):
            noise = np.round(rng.normal(0, 2.5, (height, width, 3)))
            self.noise.append((np.clip(noise, 0, 255).astype(np.uint8), np.clip(-noise, 0, 255).astype(np.uint8)))

    def pan(self, t):
        offset = self.pad + np.array(
            [
                wave(t, self.pan_amp[0], self.pan_periods[0], self.pan_phases[0]),
                wave(t, self.pan_amp[1], self.pan_periods[1], self.pan_phases[1]),
            ]
        )
        return np.round(offset).astype(int)

    def frame(self, t, index):
        ox, oy = self.pan(t)
        frame = self.texture[oy : oy + self.height, ox : ox + self.width].copy()
        mask = np.zeros((self.height, self.width), np.uint8)
        pan = np.array([ox, oy], float)
        for thing in self.back:
            for part in thing.parts(t, self.light, pan):
                paint(frame, mask, part)
        for thing in self.middle + self.front:
            for part in thing.parts(t, self.light):
                paint(frame, mask, part)
        frame = cv2.multiply(frame, self.vignette, scale=1 / 255)
        positive, negative = self.noise[(index * 7) % len(self.noise)]
        return cv2.subtract(cv2.add(frame, positive), negative), mask


def choose_extras(order):
    """Three classes beside the tool's 1-3, cycling with the video order: every class is in half
    of the videos, so each one is seen in training and found again in validation and test."""
    return {int(EXTRA_CLASSES[(order + k) % len(EXTRA_CLASSES)]) for k in range(3)}


def write_video(video_dir, scene, seconds, time_offset):
    """Render one video folder; returns the number of masks written."""
    frames = seconds * FPS
    (video_dir / "segmentation").mkdir(parents=True)
    path = video_dir / "video_left.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"XVID"), FPS, (scene.width, scene.height))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: cannot open an XVID video writer (OpenCV without FFmpeg?)")
    try:
        for index in range(frames):
            image, mask = scene.frame(time_offset + index / FPS, index)
            writer.write(image)
            if index % FRAMES_PER_MASK == 0:
                if not cv2.imwrite(str(video_dir / "segmentation" / f"{index:09d}.png"), mask):
                    raise RuntimeError(f"{video_dir}: cannot write mask {index}")
    finally:
        writer.release()
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else -1
    capture.release()
    if count != frames:
        raise RuntimeError(f"{path}: written video does not open with {frames} frames (got {count})")
    # placeholders as in the release (actions are not used for segmentation)
    (video_dir / "action_discrete.txt").write_text("".join(f"{i:09d},{(i // 120) % 8}\n" for i in range(0, frames, 6)))
    (video_dir / "action_continuous.txt").write_text(
        "".join(f"{s:09d},{min(s + 119, frames - 1):09d},{(s // 120) % 8}\n" for s in range(0, frames, 120))
    )
    return frames // FRAMES_PER_MASK + (1 if frames % FRAMES_PER_MASK else 0)


# ----------------------------------------------------------------------------- dataset


def validate(train_videos, test_videos, seconds, width, height, seed):
    if not 1 <= train_videos <= MAX_TRAIN_VIDEOS:
        raise DemoDataError(f"--train-videos must be between 1 and {MAX_TRAIN_VIDEOS} (test videos start at 41)")
    if test_videos < 0:
        raise DemoDataError("--test-videos must be 0 or more")
    if seconds < 1:
        raise DemoDataError("--seconds must be at least 1")
    for name, value in (("--width", width), ("--height", height)):
        if value < MIN_SIZE or value % 2:
            raise DemoDataError(f"{name} must be even and at least {MIN_SIZE} (got {value})")
    if seed < 0:
        raise DemoDataError("--seed must be 0 or more")


def video_plan(train_videos, test_videos):
    """(split, number, parts) per video; parts is 1, or 2 for the two-part train video."""
    two_part = train_videos - 1 if train_videos >= 3 else None
    plan = [("train", n, 2 if n == two_part else 1) for n in range(1, train_videos + 1)]
    plan += [("test", FIRST_TEST_VIDEO + k, 1) for k in range(test_videos)]
    return plan


def make_demo_dataset(
    output_dir,
    train_videos=5,
    test_videos=2,
    seconds=4,
    width=384,
    height=216,
    seed=0,
    overwrite=False,
    progress=False,
    jobs=None,
):
    """Write the dataset under output_dir; returns a summary dict (video folders, masks, frames).
    jobs: videos rendered in parallel processes (default: CPU cores); the output is the same."""
    validate(train_videos, test_videos, seconds, width, height, seed)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DemoDataError(f"{output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise DemoDataError(f"{output_dir} is not empty; pass --overwrite to replace its train/ and test/ folders")
        for split in ("train", "test"):
            if (output_dir / split).is_dir():
                shutil.rmtree(output_dir / split)
            elif (output_dir / split).exists():
                (output_dir / split).unlink()
    for split in ("train", "test"):
        (output_dir / split).mkdir(parents=True, exist_ok=True)
    plan = video_plan(train_videos, test_videos)
    tasks = [
        (output_dir / split, number, parts, order, seconds, width, height, seed)
        for order, (split, number, parts) in enumerate(plan)
    ]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    folders = masks = 0
    with progress_bars.bar(total=len(tasks), unit="video", desc="rendering", disable=not progress) as bar:
        if jobs == 1:
            results = (render_operation(*task) for task in tasks)
        else:  # each video has its own random generator: the output does not depend on jobs
            pool = ProcessPoolExecutor(max_workers=jobs)
            results = (
                future.result() for future in as_completed([pool.submit(render_operation, *task) for task in tasks])
            )
        try:
            for written_folders, written_masks in results:
                folders, masks = folders + written_folders, masks + written_masks
                bar.update()
        finally:
            if jobs > 1:
                pool.shutdown(cancel_futures=True)
    return {
        "videos": folders,
        "masks": masks,
        "frames": folders * seconds * FPS,
        "train": train_videos,
        "test": test_videos,
    }


def render_operation(split_dir, number, parts, order, seconds, width, height, seed):
    """Render one video (or both parts of a two-part one); returns (folders, masks) written."""
    cv2.setNumThreads(1)
    rng = np.random.default_rng([seed, number])
    scene = Scene(rng, width, height, choose_extras(order))
    names = [f"video_{number:02d}"] if parts == 1 else [f"video_{number:02d}_{p}" for p in range(1, parts + 1)]
    masks = 0
    for p, name in enumerate(names):
        # the parts of one operation share its scene; part 2 continues where part 1 stops
        masks += write_video(split_dir / name, scene, seconds, p * seconds)
    return len(names), masks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a small synthetic dataset in the SAR-RARP50 release layout "
        "(OUT/{train,test}/video_XX/video_left.avi + segmentation/{i:09d}.png), for tests and demos."
    )
    parser.add_argument("--output", required=True, type=Path, help="output folder (created; must be empty)")
    parser.add_argument(
        "--train-videos",
        type=int,
        default=5,
        help="train videos video_01..video_N; the second-to-last comes in two parts when N >= 3 (default: 5)",
    )
    parser.add_argument("--test-videos", type=int, default=2, help="test videos video_41... (default: 2)")
    parser.add_argument(
        "--seconds", type=int, default=4, help="length of each video, 60 fps, one mask per second (default: 4)"
    )
    parser.add_argument("--width", type=int, default=384, help="frame width, even (default: 384)")
    parser.add_argument("--height", type=int, default=216, help="frame height, even (default: 216)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default: 0)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count(),
        help="videos rendered in parallel (default: CPU cores); does not change the output",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty folder, replacing its train/ and test/ folders"
    )
    args = parser.parse_args(argv)
    try:
        validate(args.train_videos, args.test_videos, args.seconds, args.width, args.height, args.seed)
        if args.jobs < 1:
            raise DemoDataError("--jobs must be at least 1")
        if args.output.exists() and not args.output.is_dir():
            raise DemoDataError(f"{args.output} exists and is not a folder")
        if args.output.is_dir() and any(args.output.iterdir()) and not args.overwrite:
            raise DemoDataError(f"{args.output} is not empty; pass --overwrite to replace its train/ and test/ folders")
    except DemoDataError as error:
        parser.error(str(error))
    start = time.perf_counter()
    summary = make_demo_dataset(
        args.output,
        args.train_videos,
        args.test_videos,
        args.seconds,
        args.width,
        args.height,
        args.seed,
        overwrite=args.overwrite,
        progress=True,
        jobs=args.jobs,
    )
    two_part = " incl. one in two parts" if args.train_videos >= 3 else ""
    print(
        f"wrote {summary['videos']} video folders ({summary['train']} train videos{two_part}, "
        f"{summary['test']} test), {summary['masks']} masks, {summary['frames']} frames at "
        f"{args.width}x{args.height} to {args.output} in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
