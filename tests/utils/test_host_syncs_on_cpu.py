"""The host-sync counter sees what a GPU waits for, on CPU: each kind once, inside torch's and verl's helpers too,
and nothing for values that live on the host anyway."""

import pytest
import torch

from verl_cpu.testing.host_syncs import HostSyncCounter


def kinds(fn) -> list[str]:
    with HostSyncCounter() as counter:
        fn()
    return [s.kind for s in counter.syncs]


t = torch.arange(1.0, 5.0, device="cpu")  # made with a device: it stands for device memory

CASES = {
    "item": (lambda: t.sum().item(), ["item"]),
    "bool": (lambda: bool(t.any()), ["item"]),
    "float": (lambda: float(t[0]), ["item"]),
    "index": (lambda: [0, 1, 2][t.long()[1]], ["item"]),
    "tolist": (lambda: t.tolist(), ["device_to_host"]),
    "numpy": (lambda: t.numpy(), ["device_to_host"]),
    "cpu then tolist": (lambda: t.cpu().tolist(), ["device_to_host"]),
    "boolean mask": (lambda: t[t > 2], ["data_dependent_shape"]),
    "nonzero": (lambda: torch.nonzero(t), ["data_dependent_shape"]),
    "unique": (lambda: torch.unique(t), ["data_dependent_shape"]),
    "repeat_interleave": (lambda: torch.repeat_interleave(t.long()), ["data_dependent_shape"]),
    "repeat_interleave sized": (lambda: torch.repeat_interleave(t.long(), output_size=10), []),
    "equal": (lambda: torch.equal(t, t), ["equal"]),
    "python data to device": (lambda: torch.tensor([1, 2], device="cpu"), ["host_to_device"]),
    "host tensor to device": (lambda: torch.tensor([1, 2]).to("cpu"), ["host_to_device"]),
    "host tensor read": (lambda: torch.tensor([1, 2]).sum().item(), []),
    "device arithmetic": (lambda: (t * 2 + 1).exp().max(), []),
    "dtype cast": (lambda: t.to(torch.float64), []),
    "sliced by a tensor": (lambda: t[t.long()[0] : t.long()[2]], ["item", "item"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_kind_is_counted_once(name):
    fn, expected = CASES[name]
    assert kinds(fn) == expected


def test_reads_inside_torch_helpers_are_counted_by_what_they_do():
    """Unbinding a jagged tensor reads its lengths back inside torch's own code: counted there, not skipped."""
    values = torch.arange(10.0, device="cpu")
    nested = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([0, 3, 10], device="cpu"))
    with HostSyncCounter() as counter:
        nested.unbind()
    assert [s.kind for s in counter.syncs] == ["device_to_host"]
    assert "torch/nested" not in counter.syncs[0].site  # the site is the caller's line, outside torch


def test_the_counter_restores_torch_on_exit():
    before = (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__array__)
    with HostSyncCounter():
        assert torch.Tensor.tolist is not before[0]
    assert (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__array__) == before
