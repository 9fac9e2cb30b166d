"""Fixtures of the snce_fast.train tests."""
from __future__ import annotations

import pytest
import torch

from helpers_train import tiny_bert, write_vocab


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: one intra-op thread avoids spin-wait overhead on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer BERT (d 32) and its tokenizer (no downloads)."""
    d = tmp_path_factory.mktemp("tok")
    write_vocab(d)
    return tiny_bert(d)
