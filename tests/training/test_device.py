"""Device choice, autocast and CPU threads on a machine that may have no GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from potluck.training.device import autocast_context, pick_device, set_cpu_threads


def test_auto_and_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected
    assert pick_device("cpu") == torch.device("cpu")
    assert isinstance(autocast_context("cpu"), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])
def test_cuda_requested_without_cuda_is_a_clear_error(requested: str) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available.*--device cpu"):
        pick_device(requested)


@pytest.mark.parametrize("requested", ["gpu0", "mps"])
def test_unknown_devices_are_refused(requested: str) -> None:
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        pick_device(requested)


def test_set_cpu_threads() -> None:
    before = torch.get_num_threads()
    try:
        set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        set_cpu_threads(None)
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="at least 1"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)
