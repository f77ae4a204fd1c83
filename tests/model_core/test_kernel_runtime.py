"""Kernel workspaces are uninitialised memory of the asked shape, and all NaN inside poisoned_workspaces()."""

from __future__ import annotations

import torch

from model_core.kernel_runtime import new_workspace, poisoned_workspaces


def test_workspaces_are_nan_only_inside_poisoned_workspaces_nested_or_not():
    plain = new_workspace((3, 5), torch.float16, torch.device("cpu"))
    assert plain.shape == (3, 5) and plain.dtype == torch.float16
    with poisoned_workspaces():
        with poisoned_workspaces():
            assert new_workspace((2, 4), torch.float32, torch.device("cpu")).isnan().all()
        assert new_workspace((7,), torch.bfloat16, torch.device("cpu")).isnan().all()  # still poisoned: outer block
    with poisoned_workspaces():
        pass
    after = new_workspace((64,), torch.float32, torch.device("cpu"))
    assert after.shape == (64,) and after.dtype == torch.float32
