"""Regenerate every mask in examples/ from hand-measured outlines.

    python examples/make_masks.py

Each outline below was read off the photo by eye (pixel coordinates of the image as shipped here,
x to the right, y down). Binary masks are drawn at 4x the image size and box-averaged down, so their
edges carry the grey levels of real anti-aliased masks; they are written as RGB PNGs (white object on
black, as in the BAAI SegGPT examples). The one class-id map (``cameraman_classes.png``) is a palette
PNG whose pixel values are class ids (0 background, 1 photographer, 2 sky): no grey levels, each
pixel takes the class covering most of it.

Only numpy and Pillow are used; the output is byte-identical on every run (same Pillow/zlib), and
each file is written to a temporary name first, then moved into place with ``os.replace``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
SUPERSAMPLE = 4

# ---------------------------------------------------------------------------------------------
# Outlines. An outline is a list of (operation, shape, value) painted in order:
#   ("poly", [(x, y), ...], v)          filled polygon
#   ("line", [(x0, y0), (x1, y1), w], v) straight bar of width w (a thin polygon)
#   ("ellipse", (cx, cy, rx, ry), v)     filled axis-aligned ellipse
# v is 1 (object / class id) or 0 (cut a hole back out).
# ---------------------------------------------------------------------------------------------

# prompt.jpg (skimage "astronaut", 512x512): the astronaut herself - hair, face, neck ring and suit,
# with the helmet she holds (lower right) left out. The flag and the shuttle model are background.
ASTRONAUT = [
    ("poly", [
        (200, 22), (215, 16), (230, 14), (250, 18), (270, 28), (285, 42), (293, 55), (300, 73), (299, 93),
        (292, 110), (285, 122), (277, 132), (268, 138), (262, 155), (255, 172),  # hair, right jaw
        (262, 178), (280, 193), (296, 212), (303, 232), (307, 238),  # neck ring, right
        (324, 256), (346, 278), (357, 304), (361, 326), (363, 345),  # right shoulder and arm
        (361, 349), (346, 355), (331, 363), (309, 378), (294, 397), (285, 419), (280, 445), (278, 471),
        (280, 512),  # along the helmet's left rim
        (30, 512), (26, 489), (22, 452), (20, 415), (22, 378), (26, 341), (33, 311), (43, 286), (56, 260),
        (78, 237), (97, 222), (113, 210),  # left arm and shoulder
        (113, 193), (120, 172), (130, 160), (150, 151), (175, 148), (187, 147),  # neck ring, left
        (189, 135), (185, 122), (178, 113), (168, 108), (160, 100), (155, 85), (153, 65), (158, 52),
        (168, 40), (180, 30), (190, 25),  # cheek and hair, left
    ], 1),
]

# queries/cameraman.jpg (skimage "camera", 512x512, greyscale): the photographer with his camcorder
# and tripod.
CAMERAMAN = [
    ("poly", [
        (170, 93), (180, 77), (200, 65), (227, 70), (250, 83), (267, 103), (270, 120), (265, 135),
        (260, 139),  # hair
        (318, 139), (324, 141), (325, 156), (318, 158), (314, 168),  # camcorder
        (318, 167), (327, 171), (332, 184), (329, 196), (318, 201),  # right glove
        (312, 215), (305, 230), (305, 245), (305, 280), (290, 285),  # right sleeve behind the tripod
        (277, 299), (262, 306), (247, 309), (230, 306), (215, 300), (203, 294),  # forearm underside
        (187, 323), (167, 353), (143, 379), (147, 399), (150, 423), (152, 512),  # coat front, trousers
        (0, 512), (0, 257), (7, 247), (20, 223), (37, 200), (50, 183), (60, 167), (70, 150), (87, 137),
        (110, 127), (137, 117), (153, 107), (160, 100),  # back and collar
    ], 1),
    # background seen between his chin, the camcorder and his left glove
    ("poly", [(242, 182), (272, 182), (272, 200), (262, 205), (260, 244), (250, 244), (243, 215),
              (240, 195)], 0),
    # tripod: centre column, head, pan handle, two legs, spreader bars, foot
    ("poly", [(289, 187), (299, 187), (299, 486), (289, 486)], 1),
    ("poly", [(273, 187), (308, 187), (308, 199), (273, 199)], 1),  # quick-release plate
    ("poly", [(278, 313), (310, 313), (310, 344), (278, 344)], 1),
    ("line", [(307, 318), (334, 302), 5], 1),
    ("line", [(281, 333), (238, 512), 12], 1),
    ("line", [(311, 333), (407, 512), 5], 1),
    ("line", [(250, 469), (291, 483), 3], 1),
    ("line", [(250, 490), (289, 486), 3], 1),
    ("ellipse", (235, 493, 5, 8), 1),  # foot of the left leg
]

# Sky above the campus skyline behind the photographer (class 2 of cameraman_classes.png); the
# photographer (class 1) is painted over it.
CAMERAMAN_SKY = [
    ("poly", [
        (0, 0), (512, 0), (512, 190), (492, 189), (492, 176), (470, 176), (470, 164), (451, 164),
        (451, 189), (432, 189), (432, 131), (412, 131), (412, 178), (392, 175), (383, 170), (367, 166),
        (350, 169), (330, 173), (300, 186), (52, 186), (45, 176), (20, 176), (0, 180),
    ], 1),
    ("ellipse", (427, 124, 6, 6), 0),  # the dome on top of the tower
]

# queries/chelsea.jpg (skimage "chelsea", 451x300): the cat; the blurred room at the top left and
# right is background.
CHELSEA = [
    ("poly", [
        (28, 0), (398, 0), (388, 15), (376, 35), (366, 58), (364, 80), (363, 112), (361, 136), (353, 160),
        (343, 180), (340, 200), (336, 224), (332, 248), (328, 280), (324, 300),
        (0, 300), (0, 132), (16, 120), (24, 100), (30, 72), (30, 40), (28, 8),
    ], 1),
]

# queries/coffee.jpg (skimage "coffee", 600x400): the espresso cup with its saucer and spoon.
COFFEE = [
    ("poly", [
        (212, 35), (238, 23), (265, 18), (296, 19), (327, 25), (358, 38), (381, 54), (396, 68),  # cup rim
        (412, 65), (421, 72), (423, 81), (419, 100),  # spoon handle
        (420, 110), (445, 130), (465, 160), (477, 200), (479, 230), (475, 270), (462, 305), (445, 330),
        (420, 355), (390, 372), (355, 385), (320, 395), (280, 397), (260, 395), (215, 385), (180, 370),
        (150, 350), (125, 325), (105, 300), (90, 270), (80, 240), (77, 210), (80, 175), (90, 140),
        (105, 115), (125, 95), (150, 80), (175, 75),  # saucer
        (175, 90), (181, 73), (192, 50),  # cup rim, left
    ], 1),
]

# queries/rocket.jpg (skimage "rocket", 640x427): the Falcon 9, fairing to the launch mount; the
# launch towers, the strongback's base frame and the pad are background.
ROCKET = [
    ("poly", [
        (321, 128), (326, 130), (330, 137), (332, 150), (333, 165), (333, 177), (332, 200), (332, 407),
        (311, 407), (311, 177), (311, 160), (312, 145), (315, 135), (318, 130),
    ], 1),
]

# (image, mask to write, outline)
BINARY = [
    ("prompt.jpg", "prompt_mask.png", ASTRONAUT),
    ("queries/cameraman.jpg", "ground_truth/cameraman.png", CAMERAMAN),
    ("queries/chelsea.jpg", "ground_truth/chelsea.png", CHELSEA),
    ("queries/coffee.jpg", "ground_truth/coffee.png", COFFEE),
    ("queries/rocket.jpg", "ground_truth/rocket.png", ROCKET),
]

# (image, class-id map to write, [(class id, outline), ...] painted in order)
CLASS_MAPS = [
    ("queries/cameraman.jpg", "cameraman_classes.png", [(2, CAMERAMAN_SKY), (1, CAMERAMAN)]),
]

# Palette of the class-id map: 0 black, 1 and 2 as in PASCAL VOC (the index, not the colour, is the class).
PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0)]


def _scaled(points):
    return [(int(round(x * SUPERSAMPLE)), int(round(y * SUPERSAMPLE))) for x, y in points]


def _bar(p0, p1, width):
    """The four corners of a straight bar of the given width from p0 to p1."""
    a, b = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    d = b - a
    n = np.array([-d[1], d[0]]) / np.hypot(*d) * (width / 2)
    return [tuple(a + n), tuple(b + n), tuple(b - n), tuple(a - n)]


def coverage(size, outline):
    """Supersampled 0/1 picture of an outline: uint8 [H*S, W*S]."""
    w, h = size
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for op, shape, value in outline:
        if op == "poly":
            draw.polygon(_scaled(shape), fill=value)
        elif op == "line":
            p0, p1, width = shape
            draw.polygon(_scaled(_bar(p0, p1, width)), fill=value)
        elif op == "ellipse":
            cx, cy, rx, ry = shape
            draw.ellipse(_scaled([(cx - rx, cy - ry), (cx + rx, cy + ry)]), fill=value)
        else:
            raise ValueError(f"unknown operation {op!r}")
    return np.asarray(canvas, dtype=np.uint8)


def downsample_mean(hi):
    """Box-average S x S blocks of a 0/1 picture to 0..255 levels."""
    h, w = hi.shape[0] // SUPERSAMPLE, hi.shape[1] // SUPERSAMPLE
    blocks = hi.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).astype(np.int64).sum(axis=(1, 3))
    return (blocks * 255 + SUPERSAMPLE ** 2 // 2) // SUPERSAMPLE ** 2


def binary_mask(size, outline):
    """RGB anti-aliased mask (white object, black background, grey edges)."""
    level = downsample_mean(coverage(size, outline)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(level[..., None], 3, axis=-1)))  # H x W x 3 uint8: RGB


def class_map(size, layers):
    """Palette image of class ids: each pixel takes the class covering most of it (ties: the lower id)."""
    w, h = size
    hi = np.zeros((h * SUPERSAMPLE, w * SUPERSAMPLE), dtype=np.uint8)
    for class_id, outline in layers:
        cov = coverage(size, outline)
        hi[cov == 1] = class_id
    num = max(c for c, _ in layers) + 1
    counts = np.stack([(hi == c).reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).sum(axis=(1, 3)) for c in range(num)])
    labels = counts.argmax(axis=0).astype(np.uint8)
    image = Image.frombytes("P", (w, h), labels.tobytes())
    flat = [v for colour in PALETTE for v in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def save_atomically(image, path):
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", optimize=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def image_size(relative):
    with Image.open(os.path.join(HERE, relative)) as image:
        return image.size


def main() -> int:
    for image, mask, outline in BINARY:
        save_atomically(binary_mask(image_size(image), outline), os.path.join(HERE, mask))
        print(f"wrote examples/{mask}")
    for image, mask, layers in CLASS_MAPS:
        save_atomically(class_map(image_size(image), layers), os.path.join(HERE, mask))
        print(f"wrote examples/{mask}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
