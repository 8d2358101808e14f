"""Fixtures shared by several test files, built once per session, and the `slow` tier (see pyproject.toml)."""
import pytest

import monovl
from monovl.world import generate_world
from random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic world (seed 0), generated once; tests only read it."""
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, scale="small")
    return out


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    """A random debug-preset checkpoint folder (see `random_checkpoint.py`)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("random") / "ckpt")


@pytest.fixture(scope="session")
def random_loaded(random_ckpt):
    """(model, tokenizer) of `random_ckpt`, loaded once; tests only run it, never change it."""
    return monovl.load(random_ckpt)
