"""Captioned grids: every image labelled, tiny tiles upscaled for the text."""

import numpy as np
import pytest

from leapalign_jax import images


def test_captioned_grid_labels_every_tile():
  x = np.zeros((4, 16, 16, 3), np.float32)  # mid-grey tiles
  long = "a very long prompt " * 10
  out = images.captioned_grid(x, ["one", long, "", "x\ny"], cols=2)
  assert out.dtype == np.uint8 and out.shape[2] == 3
  assert out.shape[1] == 2 * (128 + 2) + 2  # 16 px tiles shown at 128 px
  first = out[2 : 2 + 128, 2 : 2 + 128]
  assert (first == 128).all()  # the tile itself
  caption = out[2 + 128 : 2 + 128 + 12, 2 : 2 + 128]
  assert (caption < 128).any()  # dark text on white
  plain = images.captioned_grid(x, ["a"] * 4, cols=2)
  headed = images.captioned_grid(x, ["a"] * 4, cols=2, headers=["A", "B"])
  assert headed.shape[0] > plain.shape[0]  # a header row on top
  assert (headed[:12] < 128).any() and not (plain[:2] < 255).any()


def test_captions_must_match_the_images():
  with pytest.raises(ValueError, match="3 captions for 4 images"):
    images.captioned_grid(np.zeros((4, 8, 8, 3)), ["a", "b", "c"])
