import os
import sys

# Tests import the repo's own packages (sparsejax, configs, experiments) from the checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
