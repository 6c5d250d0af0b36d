import pytest
import torch
from torch import nn

from llmtrain.models.rope import RotaryEmbedding, apply_rope
from tests.reference import naive_rope


def test_matches_float64_reference():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, theta=1e4, max_seq_len=32)
    x_BHTE = torch.randn(2, 3, 9, 16)
    cos, sin = rope(9)
    expected = naive_rope(x_BHTE, torch.arange(9), theta=1e4)
    torch.testing.assert_close(apply_rope(x_BHTE, cos, sin).double(), expected, atol=1e-5, rtol=1e-5)


def test_explicit_positions_match_reference_per_row():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8, theta=1e6, max_seq_len=64)
    x_BHTE = torch.randn(2, 2, 5, 8)
    positions_BT = torch.stack([torch.arange(5), torch.arange(40, 45)])
    cos, sin = rope(5, positions_BT)
    y = apply_rope(x_BHTE, cos, sin)
    for b in range(2):
        expected = naive_rope(x_BHTE[b : b + 1], positions_BT[b], theta=1e6)
        torch.testing.assert_close(y[b : b + 1].double(), expected, atol=1e-5, rtol=1e-5)


def test_none_positions_equal_arange():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    for a, b in zip(rope(7), rope(7, torch.arange(7))):
        assert torch.equal(a, b)


def test_table_stays_float32_after_bf16_cast_at_position_4095():
    theta, head_dim = 1e6, 64
    model = nn.Sequential(nn.Linear(4, 4), RotaryEmbedding(head_dim, theta, max_seq_len=4096))
    model.to(torch.bfloat16)
    rope = model[1]
    assert rope.cos_TE.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16
    cos, sin = rope(1, torch.tensor([4095]))
    angle = 4095 * theta ** (-2 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)
    expected_cos, expected_sin = torch.cat((angle.cos(), angle.cos())), torch.cat((-angle.sin(), angle.sin()))
    assert (cos[0].double() - expected_cos).abs().max() < 1e-3
    assert (sin[0].double() - expected_sin).abs().max() < 1e-3


def test_bf16_input_is_rotated_in_float32_and_returned_in_bf16():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=32, max_seq_len=4096)
    x_BHTE = torch.randn(1, 2, 1, 32).bfloat16()
    cos, sin = rope(1, torch.tensor([4095]))
    y = apply_rope(x_BHTE, cos, sin)
    assert y.dtype == torch.bfloat16
    expected = naive_rope(x_BHTE, torch.tensor([4095]), theta=1e6)
    torch.testing.assert_close(y.double(), expected, atol=2e-2, rtol=1e-2)  # bf16 output rounding only


def test_tables_are_not_saved_and_rebuilt_after_meta():
    with torch.device("meta"):
        rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    assert rope.state_dict() == {}
    rope.to_empty(device="cpu")
    fresh = RotaryEmbedding(head_dim=8, max_seq_len=16)
    assert torch.equal(rope.cos_TE, fresh.cos_TE) and torch.equal(rope.sin_TE, fresh.sin_TE)


def test_position_zero_is_identity_and_norm_is_preserved():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=8)
    x_BHTE = torch.randn(1, 1, 8, 8)
    y = apply_rope(x_BHTE, *rope(8))
    torch.testing.assert_close(y[:, :, 0], x_BHTE[:, :, 0])
    torch.testing.assert_close(y.norm(dim=-1), x_BHTE.norm(dim=-1))
    assert not torch.allclose(y, x_BHTE)


def test_odd_head_dim_names_the_value():
    with pytest.raises(ValueError, match="head_dim=7"):
        RotaryEmbedding(head_dim=7)
