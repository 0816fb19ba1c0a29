"""
What the command lines share: where a default checkpoint is found (what you trained
in out/, else the weights shipped in weights/), the default DSC head of a base, and
argparse types.
"""

import argparse
import math
import os
import sys

from corrector import OtherBase
from remasking import head_policy

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def checkpoint_path(name):
    """out/NAME once you have trained it, else the default weights shipped in weights/NAME."""
    trained = os.path.join("out", name)
    return trained if os.path.exists(trained) or not os.path.exists(os.path.join(SHIPPED, name)) \
        else os.path.join(SHIPPED, name)


def default_head(name, base_fingerprint, made_by, **overrides):
    """The DSC policy (remasking.head_policy) of the head a CLI uses when none is named:
    checkpoint_path(name), only if it was trained on the base in use (the shipped heads
    belong with the shipped base); None, with a one-line note, where it is missing or not."""
    path = checkpoint_path(name)
    if not os.path.exists(path):
        print(f"note: no head at {path}; `{made_by}` trains one", file=sys.stderr)
        return None
    try:
        return head_policy(path, base_fingerprint, made_by, **overrides)
    except OtherBase:
        print(f"note: skipping {path}: it was trained on another base than the one in use; `{made_by}` trains "
              "one for it", file=sys.stderr)
        return None


def positive(kind):
    """An argparse type: a number above zero, or a one-line error."""
    def parse(text):
        value = kind(text)
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        return value
    return parse

