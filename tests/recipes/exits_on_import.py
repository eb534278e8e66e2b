"""Test recipe that calls sys.exit(0) while loading (a script's ending left in), which must not look like success."""

import sys

from launcher import TrainConfig

config = TrainConfig()
sys.exit(0)
