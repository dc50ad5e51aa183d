"""The synthetic shapes dataset: what the captions promise is what the images hold."""

import numpy as np

from cachetrain.tiny.shapes import COLOURS, shape_images


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_centred_shapes_make_every_image_of_a_caption_the_same_and_fill_the_middle():
    images = list(shape_images(64, 64, seed=0, colours=("red", "yellow"), backgrounds=("blue", "black"),
                               shapes=("circle", "square"), centred=True))
    by_caption: dict[str, list[np.ndarray]] = {}
    for image in images:
        by_caption.setdefault(image.info["caption"], []).append(_pixels(image))
    assert len(by_caption) == 8  # 2 shapes x 2 colours x 2 backgrounds, all drawn
    for caption, pixels in by_caption.items():
        assert all(np.array_equal(pixels[0], other) for other in pixels[1:]), caption
        colour = caption.split()[1]
        assert tuple(pixels[0][32, 32]) == COLOURS[colour]  # the shape covers the middle
        assert tuple(pixels[0][0, 0]) != COLOURS[colour]  # ... and not the corner


def test_shapes_by_default_vary_in_size_and_place():
    images = list(shape_images(64, 64, seed=0, shapes=("square",), colours=("red", "yellow"),
                               backgrounds=("blue", "black")))
    boxes = set()
    for image in images:
        colour = COLOURS[image.info["caption"].split()[1]]
        rows, cols = np.nonzero(np.all(_pixels(image) == colour, axis=-1))
        boxes.add((rows.min(), cols.min(), rows.max(), cols.max()))
    assert len(boxes) > 32  # hardly two squares alike
