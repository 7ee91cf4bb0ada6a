"""core/restore.py: what is written inside the block is undone bit for bit, saving only what the index names."""

from __future__ import annotations

import pytest
import torch

from npft_lightning.core.restore import values_restored, weights_restored


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 6, generator=g), "b": torch.randn(3, 5, generator=g).to(torch.bfloat16)}


@pytest.mark.parametrize("index", [
    None,                                                        # every entry
    {"a": torch.tensor([0, 7, 23], dtype=torch.int32)},          # flat indices (b: every entry)
    {"a": torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.5,
     "b": torch.tensor([1, 2], dtype=torch.int64)},              # a boolean mask shaped like the tensor
])
def test_values_written_inside_are_put_back_exactly(index):
    live = tensors()
    start = {k: v.clone() for k, v in live.items()}
    with values_restored(live, index) as saved:
        for name, t in live.items():
            idx = (index or {}).get(name)
            assert saved[name].numel() == (t.numel() if idx is None else int(idx.sum()) if idx.dtype == torch.bool else idx.numel())
            t.view(-1)[(idx if idx is not None else torch.arange(t.numel())).reshape(-1)] = 1e3  # where the index allows
        assert not any(torch.equal(start[k], v) for k, v in live.items())
    assert all(torch.equal(start[k], v) and start[k].dtype == v.dtype for k, v in live.items())


def test_weights_come_back_when_the_block_raises():
    linear = torch.nn.Linear(3, 2)
    start = linear.weight.detach().clone()
    with pytest.raises(RuntimeError, match="midway"), weights_restored({"l": linear}) as originals:
        with torch.no_grad():
            linear.weight.mul_(2)
        assert torch.equal(originals["l"], start)
        raise RuntimeError("midway")
    assert torch.equal(linear.weight, start)
