"""The networks' linear layer (`sdtorch.linear`): oneDNN's product where chosen, F.linear's numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import max_rel_error

from sdtorch import linear as linear_module
from sdtorch.errors import SdtorchError
from sdtorch.linear import Linear, linear, linear_kernel, onednn_linear_available

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN linear in this PyTorch or CPU")


def counting_onednn_linears(monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes of each linear that oneDNN computes, from now on."""
    calls, product = [], linear_module.onednn_linear

    def counted(x, weight, bias):
        calls.append(tuple(x.shape))
        return product(x, weight, bias)

    monkeypatch.setattr(linear_module, "onednn_linear", counted)
    return calls


@needs_onednn
def test_onednn_linear_gives_f_linear_numbers_for_every_input_layout(monkeypatch):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    inputs = {
        "2-D": torch.randn(7, 40, generator=g),
        "3-D": torch.randn(2, 9, 40, generator=g),
        "4-D": torch.randn(2, 3, 5, 40, generator=g),
        "transposed": torch.randn(9, 2, 40, generator=g).transpose(0, 1),
        "strided rows": torch.randn(2, 9, 80, generator=g)[..., ::2],
    }
    calls = counting_onednn_linears(monkeypatch)
    with linear_kernel("onednn"), torch.no_grad():
        for name, x in inputs.items():
            for w, b in ((weight, bias), (weight, None), (torch.randn(40, 48, generator=g).t(), bias)):
                got, expected = linear(x, w, b), F.linear(x, w, b)
                assert got.shape == expected.shape, name
                assert max_rel_error(got, expected) <= 1e-5, name
        assert linear(torch.empty(0, 40), weight, bias).shape == (0, 48)  # no rows: F.linear's
    assert len(calls) == len(inputs) * 3


@needs_onednn
def test_what_onednn_does_not_compute_goes_to_f_linear(monkeypatch):
    """Gradients wanted, another dtype or the BLAS kernel asked for: F.linear, the same numbers exactly."""
    layer = Linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    calls = counting_onednn_linears(monkeypatch)
    with linear_kernel("onednn"):
        layer(x).sum().backward()  # the oneDNN op has no backward
        assert x.grad is not None and layer.weight.grad is not None
        with torch.no_grad():
            half = Linear(16, 8).to(torch.bfloat16)
            assert torch.equal(half(x.bfloat16()), F.linear(x.bfloat16(), half.weight, half.bias))
    with linear_kernel("blas"), torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert calls == []
    with torch.no_grad(), linear_kernel("onednn"):
        layer(x)
    assert calls == [(3, 16)]


def test_the_kernel_choice_accepts_only_known_kernels(monkeypatch):
    from sdtorch.runtime import Runtime

    with pytest.raises(SdtorchError, match="accepted: onednn, blas"), linear_kernel("mkl"):
        pass
    monkeypatch.setenv(linear_module.CPU_LINEAR_VARIABLE, "fast")
    linear_module.default_kernel.cache_clear()
    try:
        wrong = "SDTORCH_CPU_LINEAR='fast' is not a linear kernel; accepted: onednn, blas"
        with pytest.raises(SdtorchError, match=wrong):
            Runtime.choose("cpu", "fp32")
        monkeypatch.setenv(linear_module.CPU_LINEAR_VARIABLE, "blas")
        linear_module.default_kernel.cache_clear()
        assert linear_module.default_kernel() == "blas"
    finally:
        monkeypatch.delenv(linear_module.CPU_LINEAR_VARIABLE)
        linear_module.default_kernel.cache_clear()


def test_amd_cpus_default_to_onednn_and_others_to_blas(monkeypatch):
    for vendor, expected in (("AuthenticAMD", "onednn"), ("GenuineIntel", "blas"), ("", "blas")):
        monkeypatch.setattr(linear_module, "_cpu_vendor", lambda vendor=vendor: vendor)
        linear_module.default_kernel.cache_clear()
        assert linear_module.default_kernel() == (expected if onednn_linear_available() else "blas"), vendor
    monkeypatch.undo()
    linear_module.default_kernel.cache_clear()


def test_stored_linears_compute_through_the_chosen_kernel(monkeypatch):
    """A 16-bit weight kept as stored widens, then goes to the same `linear`."""
    from sdtorch.stored_weights import StoredLinear, keep_stored

    layer = keep_stored(torch.nn.Sequential(Linear(16, 8)).half(), torch.float32)[0]
    assert isinstance(layer, StoredLinear) and layer.weight.dtype == torch.float16
    x = torch.randn(4, 16)
    expected = F.linear(x, layer.weight.float(), layer.bias.float())
    calls = counting_onednn_linears(monkeypatch)
    kernels = ("onednn", "blas") if onednn_linear_available() else ("blas",)
    for kernel in kernels:
        with linear_kernel(kernel), torch.no_grad():
            assert max_rel_error(layer(x), expected) <= 1e-5
    assert len(calls) == (1 if onednn_linear_available() else 0)
