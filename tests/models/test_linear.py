"""llmtrain.models.linear: oneDNN's inner product gives F.linear's values and gradients; without
autograd, the kept transposed (and fused) weights give F.linear's values and follow every weight change."""

import platform

import pytest
import torch
import torch.nn.functional as F

from llmtrain.hardware import Hardware
from llmtrain.models import linear as onednn
from llmtrain.models.ffn import SwiGLU
from llmtrain.models.linear import (Linear, disable_weight_copies, kept_product, linear, mkl_packing_available,
                                   onednn_available, onednn_pays_off, use_onednn)
from llmtrain.models.attention_gqa import GQAttention
from llmtrain.models.attention_mla import MLAttention
from llmtrain.models.rope import RotaryEmbedding

needs_onednn = pytest.mark.skipif(not onednn_available(),
                                  reason=f"no oneDNN inner product on {platform.machine()} in this torch build")
needs_mkl_packing = pytest.mark.skipif(not (mkl_packing_available() and platform.machine() in ("x86_64", "AMD64")),
                                       reason="no MKL packed sgemm in this torch build")


@pytest.fixture(autouse=True)
def restore_switch(monkeypatch):
    for name in ("_enabled", "_onednn", "_copies", "_packing"):  # put back after each test, whatever use_onednn set
        monkeypatch.setattr(onednn, name, getattr(onednn, name))
    monkeypatch.setattr(onednn, "MIN_MACS", 0)      # these tests' small matmuls take the oneDNN path too
    monkeypatch.setattr(onednn, "onednn_pays_off", lambda: True)   # test the oneDNN path on any x86 CPU
    monkeypatch.setattr(onednn, "mkl_packing_pays_off", lambda: True)   # and the packed copies


COPY_KINDS = ["transposed", pytest.param("packed", marks=needs_mkl_packing)]


def use_copy_kind(kind, monkeypatch):
    """Kept copies of every size as `kind`: x @ w_t ("transposed") or MKL-packed weights ("packed")."""
    monkeypatch.setattr(onednn, "PACK_MIN_NUMEL", 0 if kind == "packed" else 1 << 62)
    use_onednn(True)
    assert onednn._packing or kind == "transposed"


def kept_kind(module) -> str:
    return "packed" if module.__dict__["_kept_weights"][1] else "transposed"


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
        linear(x, layer.weight, layer.bias)      # no grad: the op itself, no autograd node
        layer(x)                                 # the layer takes its transposed copy instead
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


@pytest.mark.parametrize("capability, vendor, pays_off", [("AVX512", "AuthenticAMD", True), ("AVX2", "AuthenticAMD", False),
                                                          ("AVX512", "GenuineIntel", False), ("AVX512", "", False)])
def test_onednn_trains_only_on_avx512_amd_cpus(capability, vendor, pays_off, monkeypatch):
    # measured faster there only (benchmarks/README.md): slower on an AVX2 AMD and an AVX-512 Intel draw
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    assert onednn_pays_off() == pays_off      # the function itself, imported before the fixture replaced it


def test_without_avx512_training_keeps_f_linear_and_no_grad_keeps_the_copies(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_pays_off", lambda: False)     # an AVX2-only or Intel CPU
    monkeypatch.setattr(onednn, "_INNER_PRODUCT", lambda *args: pytest.fail("oneDNN path taken"))
    assert not use_onednn(True)
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(5, 16, requires_grad=True)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        layer(x)
    assert "_kept_weights" in layer.__dict__                      # the no-grad copy still applies


def test_hardware_switch_reaches_the_layers():
    Hardware(device="cpu", precision="fp32", onednn_linear=False)
    assert not onednn.onednn_enabled()
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(5, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))   # bit for bit: MKL's own result
    assert Hardware(device="cpu", precision="fp32").onednn_linear == onednn_available()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("bias", [False, True])
def test_no_grad_layer_uses_a_transposed_copy_with_f_linear_values(mode, bias):
    use_onednn(True)
    torch.manual_seed(0)
    layer, x = Linear(48, 40, bias=bias), torch.randn(3, 5, 48)
    want = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    w_t = layer.__dict__["_kept_weights"][3]
    assert w_t.shape == (48, 40) and w_t.is_contiguous() and not w_t.is_inference()
    assert set(layer.state_dict()) == ({"weight", "bias"} if bias else {"weight"})   # not a buffer


@pytest.mark.parametrize("kind", COPY_KINDS)
def test_the_copy_follows_optimizer_steps_and_loads(kind, monkeypatch):
    use_copy_kind(kind, monkeypatch)
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    for _ in range(2):
        with torch.no_grad():
            before = layer(x)
        layer(x).square().sum().backward()       # grad mode: no copy involved
        optimizer.step()
        optimizer.zero_grad()
        with torch.inference_mode():
            after = layer(x)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, F.linear(x, layer.weight.detach(), layer.bias.detach()))
    layer.load_state_dict({"weight": torch.zeros(8, 16), "bias": torch.ones(8)})
    with torch.no_grad():
        assert torch.equal(layer(x), torch.ones(4, 8))


def test_grad_mode_and_switched_off_calls_make_no_copy():
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16, requires_grad=True)
    use_onednn(True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and "_kept_weights" not in layer.__dict__
    use_onednn(False)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))   # bit for bit: plain F.linear
    assert "_kept_weights" not in layer.__dict__


def layer_and_call(module: str, x):
    """A fresh layer of kind `module` ("linear", "gqa", "mla", "mla_qlora" or "swiglu") for x (2, 6, 64)
    and a call of it."""
    if module.startswith("mla"):   # q (and the latent) from one fused matmul without autograd
        layer = MLAttention(64, n_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                            q_lora_rank=20 if module == "mla_qlora" else None)
        cos, sin = RotaryEmbedding(8)(6)
        return layer, lambda: layer(x, cos, sin)
    if module == "linear":
        layer = Linear(64, 32)
        return layer, lambda: layer(x)
    if module == "gqa":
        layer = GQAttention(64, n_heads=4, n_kv_heads=2)
        cos, sin = RotaryEmbedding(16)(6)
        return layer, lambda: layer(x, cos, sin)
    layer = SwiGLU(64)
    return layer, lambda: layer(x)


@pytest.mark.parametrize("kind", COPY_KINDS)
@pytest.mark.parametrize("module", ["linear", "gqa", "mla", "swiglu"])
def test_disabled_copies_follow_writes_that_bypass_the_version_counter(module, kind, monkeypatch):
    """`.data` writes (and FSDP2's all-gathers) leave version and pointer as they were: a kept copy
    would be stale, so such models turn the copies off and every call reads the weight itself."""
    use_copy_kind(kind, monkeypatch)
    torch.manual_seed(0)
    layer, run = layer_and_call(module, torch.randn(2, 6, 64))
    with torch.no_grad():
        run()
    assert any("_kept_weights" in m.__dict__ for m in layer.modules())   # a copy was kept
    disable_weight_copies(layer)
    assert not any("_kept_weights" in m.__dict__ for m in layer.modules())
    for p in layer.parameters():
        p.data.copy_(torch.randn_like(p))         # behind the version counter
    want = run()                                  # grad mode: reads the parameters
    with torch.no_grad():
        got = run()
    assert not any("_kept_weights" in m.__dict__ for m in layer.modules())
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", COPY_KINDS)
def test_stacked_weights_fuse_several_linears_in_order(kind, monkeypatch):
    use_copy_kind(kind, monkeypatch)
    torch.manual_seed(0)
    a, b, holder = Linear(16, 8, bias=False), Linear(16, 4, bias=False), torch.nn.Module()
    x = torch.randn(3, 16)
    with torch.no_grad():
        fused = kept_product(holder, x, (a, b))
        torch.testing.assert_close(fused, torch.cat([F.linear(x, a.weight), F.linear(x, b.weight)], -1))
        b.weight.mul_(2)                         # one member changes: the stack is made again
        torch.testing.assert_close(kept_product(holder, x, (a, b)),
                                   torch.cat([F.linear(x, a.weight), F.linear(x, b.weight)], -1))


@pytest.mark.parametrize("kind", COPY_KINDS)
@pytest.mark.parametrize("module", ["gqa", "mla", "mla_qlora", "swiglu"])
def test_fused_no_grad_modules_match_their_autograd_forward(module, kind, monkeypatch):
    use_copy_kind(kind, monkeypatch)
    torch.manual_seed(0)
    layer, run = layer_and_call(module, torch.randn(2, 6, 64))
    want = run()                                  # grad mode: the three separate linears
    with torch.no_grad():
        got = run()
    assert "_kept_weights" in layer.__dict__ and kept_kind(layer) == kind  # the fused path ran
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


@needs_mkl_packing
@pytest.mark.parametrize("bias", [False, True])
def test_large_weights_get_a_packed_copy_with_f_linear_values(bias, monkeypatch):
    monkeypatch.setattr(onednn, "onednn_pays_off", lambda: False)   # as on the Intel CPU packing was measured on
    use_onednn(True)                            # real thresholds: 512 x 512 is PACK_MIN_NUMEL
    torch.manual_seed(0)
    layer, small = Linear(512, 512, bias=bias), Linear(512, 511, bias=bias)
    x = torch.randn(16, 1, 512)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
        small(x)
    assert kept_kind(layer) == "packed" and layer.__dict__["_kept_weights"][2] == 16
    assert kept_kind(small) == "transposed"
    assert set(layer.state_dict()) == ({"weight", "bias"} if bias else {"weight"})   # not a buffer


@needs_mkl_packing
def test_packed_copy_follows_the_row_count_and_leaves_large_calls_to_the_parameters(monkeypatch):
    use_copy_kind("packed", monkeypatch)
    monkeypatch.setattr(onednn, "PACK_MAX_ROWS", 16)
    torch.manual_seed(0)
    layer = Linear(32, 24)
    with torch.no_grad():
        for rows in (16, 5, 17, 5):             # a decode size, another, a prefill-sized call, back
            x = torch.randn(rows, 32)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
            assert layer.__dict__["_kept_weights"][2] == (5 if rows == 17 else rows)   # 17 rows: kept as it was
        assert kept_product(layer, torch.randn(17, 32), (layer,)) is None


@needs_mkl_packing
@pytest.mark.parametrize("kind", ["single", "fused"])
def test_packed_copy_reads_strided_inputs_correctly(kind, monkeypatch):
    # The packed product gets only the shape of the weight (a zero-stride stand-in for the fused
    # stack): any call that fell back to that stand-in would give zeros, not F.linear's values.
    use_copy_kind("packed", monkeypatch)
    torch.manual_seed(0)
    layer = Linear(32, 24, bias=False)
    holder, linears = (layer, (layer,)) if kind == "single" else (torch.nn.Module(), (layer, Linear(32, 12, bias=False)))
    base = torch.randn(4, 3, 64)
    for x in (base[..., ::2], base[..., :32].transpose(0, 1), base[:, :1, :32], base[:, :, :32]):
        with torch.no_grad():
            got = kept_product(holder, x, linears)
        want = torch.cat([F.linear(x, linear.weight) for linear in linears], -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("pays_off", [True, False])
def test_where_onednn_pays_off_large_no_grad_calls_skip_the_copies(pays_off, monkeypatch):
    """On AMD AVX-512 CPUs (oneDNN on) a no-grad call of NO_GRAD_ONEDNN_MIN_MACS or more runs on oneDNN,
    one linear at a time, and keeps no copy; smaller calls, and every call elsewhere, keep theirs."""
    monkeypatch.setattr(onednn, "onednn_pays_off", lambda: pays_off)
    monkeypatch.setattr(onednn, "NO_GRAD_ONEDNN_MIN_MACS", 8 * 64 * 32)    # 8 rows of a 64 -> 32 layer
    calls = []
    real = onednn._INNER_PRODUCT
    monkeypatch.setattr(onednn, "_INNER_PRODUCT", lambda *args: calls.append(args[0].shape) or real(*args))
    assert use_onednn(True) == pays_off
    torch.manual_seed(0)
    small, large = Linear(64, 32), Linear(64, 32)
    x_small, x_large = torch.randn(7, 64), torch.randn(2, 4, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x_small), F.linear(x_small, small.weight, small.bias))
        torch.testing.assert_close(large(x_large), F.linear(x_large, large.weight, large.bias), rtol=1e-5, atol=1e-6)
    assert "_kept_weights" in small.__dict__
    assert ("_kept_weights" in large.__dict__) != pays_off
    assert calls == ([(2, 4, 64)] if pays_off else [])
    layer, run = layer_and_call("gqa", torch.randn(2, 6, 64))   # q, k, v fused: 12 x 64 x 128 MACs
    want = run()
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(run(), want.detach(), rtol=1e-5, atol=1e-6)
    assert ("_kept_weights" in layer.__dict__) != pays_off            # no fused copy where oneDNN runs
    assert bool(calls) == pays_off                                    # the projections went to oneDNN


@needs_mkl_packing
def test_an_empty_call_at_packing_size_runs_on_the_parameters(monkeypatch):
    """MKL's packing of a weight for 0 rows dies with SIGFPE (no Python exception): an MoE expert no
    token chose, at the small preset's width (stacked gate/up 896 x 512), must not get there."""
    use_copy_kind("packed", monkeypatch)
    torch.manual_seed(0)
    ffn = SwiGLU(512, 448)
    with torch.no_grad():
        assert ffn(torch.randn(0, 512)).shape == (0, 512)
        x = torch.randn(3, 512)
        torch.testing.assert_close(ffn(x), ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", COPY_KINDS)
def test_a_dtype_round_trip_drops_the_copy(kind, monkeypatch):
    """`.half().float()` assigns new storage with the same version counter; the allocator may hand
    back the old address, so the copy must not be trusted by (version, pointer) alone."""
    use_copy_kind(kind, monkeypatch)
    torch.manual_seed(0)
    layer, x = Linear(64, 64), torch.randn(4, 64)
    model = torch.nn.Sequential(layer)
    with torch.no_grad():
        layer(x)
        assert "_kept_weights" in layer.__dict__
        model.half().float()
        assert "_kept_weights" not in layer.__dict__
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
    # A holder other than Linear keeps its copy across `.to()`, but the copy holds the old storage,
    # so the new weight lives at another address and the key no longer matches.
    ffn = SwiGLU(64, 48)
    with torch.no_grad():
        ffn(x)
        ffn.half().float()
        torch.testing.assert_close(ffn(x), ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x)), rtol=1e-5, atol=1e-6)
