"""Neuron cards on hand-made maps: where a heatmap is hot, and what a card holds."""

import numpy as np
import torch
from PIL import Image

from mmn.analysis.cards import HEADER, TEXT, TILE, CardUnit, heat_tile, neuron_card


def test_a_hot_patch_is_the_brightest_part_of_its_tile():
    image = Image.new("RGB", (64, 64), (40, 40, 40))
    hot = torch.zeros(4, 4)
    hot[1, 2] = 1.0  # row 1, column 2 of a 4 x 4 grid: pixels [32, 64) x [64, 96) of the 128-pixel tile
    tile = np.asarray(heat_tile(image, hot)).astype(float).sum(axis=2)  # brightness [TILE, TILE]
    row, column = np.unravel_index(tile.argmax(), tile.shape)
    assert 32 <= row < 64 and 64 <= column < 96
    flat = np.asarray(heat_tile(image, torch.ones(4, 4)))
    assert (flat == flat[0, 0]).all()  # a unit that does not respond: one colour, no spurious hot spot


def test_a_card_has_a_row_per_unit_in_uint8_rgb():
    image = Image.new("RGB", (100, 60), (200, 10, 10))
    units = [CardUnit(f"L{i}.u{i}", [" red", " circle"], i % 2 == 0, torch.rand(3, 3), torch.rand(3, 3))
             for i in range(3)]
    card = neuron_card(image, "a red circle", " circle", units)
    pixels = np.asarray(card)
    assert card.mode == "RGB" and pixels.dtype == np.uint8
    assert card.size == (2 * TILE + TEXT, HEADER + 3 * TILE)
    # each row's two tiles are heatmaps over the (squash-resized) image, not blank
    for row in range(3):
        tiles = pixels[HEADER + row * TILE : HEADER + (row + 1) * TILE, : 2 * TILE]
        assert tiles.std() > 10
