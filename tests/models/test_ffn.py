import pytest
import torch

from llmtrain.models.ffn import SwiGLU, swiglu_hidden_dim
from tests.reference import naive_swiglu


@pytest.mark.parametrize("dim, hidden", [(512, 1408), (128, 384), (64, 192), (2048, 5504)])
def test_default_hidden_follows_minimind_2025_rule(dim, hidden):
    assert swiglu_hidden_dim(dim) == hidden
    assert SwiGLU(dim).hidden_dim == hidden


def test_matches_naive_reference():
    torch.manual_seed(0)
    ffn = SwiGLU(16, hidden_dim=40)
    x = torch.randn(2, 3, 16)
    expected = naive_swiglu(x, ffn.w1.weight, ffn.w2.weight, ffn.w3.weight)
    torch.testing.assert_close(ffn(x), expected, atol=1e-5, rtol=1e-5)


def test_gate_and_up_are_not_interchangeable():
    torch.manual_seed(0)
    ffn = SwiGLU(8, hidden_dim=16)
    x = torch.randn(4, 8)
    swapped = naive_swiglu(x, ffn.w3.weight, ffn.w2.weight, ffn.w1.weight)
    assert not torch.allclose(ffn(x), swapped, atol=1e-3)


def test_bad_hidden_dim_names_the_value():
    with pytest.raises(ValueError, match="hidden_dim=0"):
        SwiGLU(8, hidden_dim=0)
