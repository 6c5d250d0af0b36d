"""llmtrain.models.linear: oneDNN's inner product gives F.linear's values and gradients."""

import platform

import pytest
import torch
import torch.nn.functional as F

from llmtrain.hardware import Hardware
from llmtrain.models import linear as onednn
from llmtrain.models.linear import Linear, linear, onednn_available, use_onednn

needs_onednn = pytest.mark.skipif(not onednn_available(),
                                  reason=f"no oneDNN inner product on {platform.machine()} in this torch build")


@pytest.fixture(autouse=True)
def restore_switch(monkeypatch):
    before = onednn.onednn_enabled()
    monkeypatch.setattr(onednn, "MIN_MACS", 0)      # these tests' small matmuls take the oneDNN path too
    yield
    use_onednn(before)


def test_onednn_is_available_on_x86_linux():
    # CI and the benchmarks run on x86-64 Linux, where every torch wheel bundles oneDNN: the fast
    # path must not silently turn itself off there.
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert onednn_available()


def _inputs(shape, out_features, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_features, shape[-1], generator=g, dtype=torch.float64) / shape[-1] ** 0.5
    b = torch.randn(out_features, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(*shape[:-1], out_features, generator=g, dtype=torch.float64)
    return x, w, b, dy


def _grads(fn, x, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves) if b is not None else fn(*leaves, None)
    y.backward(dy.to(y.dtype))
    return y.detach().double(), [t.grad.double() for t in leaves]


@needs_onednn
@pytest.mark.parametrize("shape, out_features, bias", [((33, 48), 40, False), ((3, 17, 64), 96, True),
                                                       ((16, 1, 128), 264, False), ((2, 5, 7, 24), 8, True)])
def test_values_and_gradients_match_a_float64_reference(shape, out_features, bias):
    x, w, b, dy = _inputs(shape, out_features, bias)
    want_y, want_grads = _grads(F.linear, x, w, b, dy)
    use_onednn(True)
    got_y, got_grads = _grads(linear, *(None if t is None else t.float() for t in (x, w, b)), dy.float())
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_fp32_cpu_calls_take_the_onednn_path(monkeypatch):
    calls = []
    real = onednn._INNER_PRODUCT
    monkeypatch.setattr(onednn, "_INNER_PRODUCT", lambda *args: calls.append(args[0].shape) or real(*args))
    use_onednn(True)
    layer = Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()                    # forward, dx and dw: three inner products
    assert len(calls) == 3
    with torch.no_grad():
        layer(x)                                 # inference: the op itself, no autograd node
    assert len(calls) == 4


@pytest.mark.parametrize("case", ["switched off", "bf16 input", "autocast", "empty input", "1-d input",
                                  "below MIN_MACS"])
def test_other_calls_are_plain_f_linear(case, monkeypatch):
    use_onednn(case != "switched off")
    monkeypatch.setattr(onednn, "_INNER_PRODUCT", lambda *args: pytest.fail("oneDNN path taken"))
    if case == "below MIN_MACS":
        monkeypatch.setattr(onednn, "MIN_MACS", 4 * 8 * 6 + 1)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    if case == "bf16 input":
        x, w = x.bfloat16(), w.bfloat16()
    if case == "empty input":
        x = x[:0]
    if case == "1-d input":
        x = x[0]
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(linear(x, w), F.linear(x, w))
        return
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_hardware_switch_reaches_the_layers():
    Hardware(device="cpu", precision="fp32", onednn_linear=False)
    assert not onednn.onednn_enabled()
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(5, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))   # bit for bit: MKL's own result
    assert Hardware(device="cpu", precision="fp32").onednn_linear == onednn_available()
