"""ModelOpt 0.47, the outside oracle of the MX and FP8 block numerics (nvidia-modelopt==0.47.0, the dev extra)."""

import importlib

import pytest

VERSION = "0.47.0"
# One worker imports ModelOpt (tens of seconds) and runs every test that compares with it.
WITH_MODELOPT = pytest.mark.xdist_group("modelopt")


def modelopt_module(name: str):
    """The ModelOpt module `name`, for a test that compares with it: skipped without nvidia-modelopt 0.47 (the rules
    checked are that version's)."""
    module = pytest.importorskip(name, reason=f"needs nvidia-modelopt {VERSION}")
    version = importlib.import_module("modelopt").__version__
    if version != VERSION:
        pytest.skip(f"the rules here are ModelOpt {VERSION}'s, nvidia-modelopt {version} is installed")
    return module
