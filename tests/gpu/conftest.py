import os

import jax
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
  # This hook sees every collected test, not only this folder's: skip just ours.
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if str(item.path).startswith(HERE):
      item.add_marker(skip)
