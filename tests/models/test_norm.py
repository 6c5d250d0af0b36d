import pytest
import torch

from llmtrain.models.norm import RMSNorm
from tests.reference import naive_rms_norm


def test_known_value_from_specs():
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    y = norm(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(y, torch.tensor([[0.8485, 2.2627]]), atol=1e-4, rtol=0)


def test_matches_naive_reference():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16) * 3
    torch.testing.assert_close(norm(x).double(), naive_rms_norm(x, norm.weight, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_no_grad_call_equals_the_autograd_one(eps):
    """Without autograd an fp32 norm is one F.rms_norm call: the same numbers as the op-by-op forward."""
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16) * 3
    want = norm(x)                       # grad mode: the op-by-op path
    with torch.no_grad():
        got = norm(x)
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.double(), naive_rms_norm(x, norm.weight, eps), atol=1e-5, rtol=1e-5)


def test_bf16_casts_back_before_the_gain():
    torch.manual_seed(0)
    norm = RMSNorm(16).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    with torch.no_grad():                # bf16 keeps the op-by-op order without autograd too
        assert torch.equal(norm(x), expected)


def test_bad_dim_names_the_value():
    with pytest.raises(ValueError, match="dim=0"):
        RMSNorm(0)
