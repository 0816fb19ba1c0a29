"""
What the command lines share: where a default checkpoint is found (what you trained
in out/, else the weights shipped in weights/), the default DSC head of a base, and
argparse types and the checks of flags and report paths made before any work.
"""

import argparse
import json
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


def check_flags(args, checks=()):
    """ValueError naming the first flag that cannot work, checked before any work: the
    flags both training scripts share, then `checks`, (flag, holds, what it must be)."""
    shared = [("--batch-size", args.batch_size >= 1, "at least 1"),
              ("--max-iters", args.max_iters >= 1, "at least 1"),
              ("--lr", math.isfinite(args.lr) and args.lr > 0, "a finite number above 0"),
              ("--min-lr-frac", 0 <= args.min_lr_frac <= 1, "between 0 and 1"),
              ("--warmup", args.warmup >= 0, "at least 0")]
    for flag, holds, want in shared + list(checks):
        if not holds:
            raise ValueError(f"{flag} must be {want}, got {getattr(args, flag[2:].replace('-', '_'))}")


def seed(text):
    """An argparse type: a seed that torch and random both take, 0 to 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 2**63 - 1, got {text}")
    return value


PNG = b"\x89PNG\r\n\x1a\n"


def check_report_path(path, suffix):
    """ValueError, before any work, where writing a report (.json or .png) to `path` would
    destroy something: a name without that suffix, or an existing file that is not already
    such a report (a checkpoint by any spelling of its path, above all)."""
    if not path.endswith(suffix):
        raise ValueError(f"{path}: a {suffix} report goes to a file whose name ends {suffix}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory")
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                report = f.read(8) == PNG if suffix == ".png" else isinstance(json.loads(f.read()), dict)
        except (OSError, ValueError):
            report = False
        if not report:
            raise ValueError(f"{path} holds something other than a {suffix} report; not writing over it")
