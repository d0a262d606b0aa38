"""ContextUnet: shapes, parameter count, determinism, and its input checks."""
import pytest
import torch

import diffusion_utilities as du


def test_parameter_count():
    # The course's 1,480,771 plus the 1x1 shortcut conv (3*64 + 64) it rebuilt randomly on every call.
    m = du.ContextUnet(in_channels=3, n_feat=64, n_cfeat=5, height=16)
    assert du.count_parameters(m) == 1_480_771 + 256
    assert "init_conv.shortcut.weight" in m.state_dict()


def test_output_shape_and_determinism():
    torch.manual_seed(0)
    m = du.ContextUnet().eval()
    x = torch.randn(4, 3, 16, 16)
    t = torch.rand(4)
    c = du.one_hot(torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        a, b = m(x, t, c), m(x, t, c)
    assert a.shape == x.shape
    assert torch.equal(a, b)  # the course's version differed by up to 1.76 between two identical calls


def test_none_context_is_zero_context_and_context_matters():
    torch.manual_seed(0)
    m = du.ContextUnet(n_feat=16).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.equal(m(x, t), m(x, t, torch.zeros(2, 5)))
        assert not torch.allclose(m(x, t), m(x, t, du.one_hot(torch.tensor([1, 1]))))
        # a scalar time broadcasts over the batch
        assert torch.allclose(m(x, 0.5), m(x, t))


@pytest.mark.parametrize("h", [16, 20, 24, 28, 32, 64])
def test_heights_divisible_by_4(h):
    m = du.ContextUnet(n_feat=16, height=h).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, h, h), torch.rand(2)).shape == (2, 3, h, h)


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 4"):
        du.ContextUnet(height=18)
    m = du.ContextUnet(n_feat=16)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m(torch.randn(3, 16, 16), torch.rand(1))
    with pytest.raises(ValueError, match="n_cfeat"):
        m(torch.randn(2, 3, 16, 16), torch.rand(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="t must hold"):
        m(torch.randn(2, 3, 16, 16), torch.rand(3))
    with pytest.raises(ValueError, match="class ids"):
        du.one_hot(torch.tensor([0, 5]))


def test_channels_last_and_bf16_agree_with_fp32():
    # The fast settings must compute the same function (up to bf16 rounding).
    torch.manual_seed(0)
    m = du.ContextUnet(n_feat=16).eval()
    x, t = torch.randn(4, 3, 16, 16), torch.rand(4)
    with torch.no_grad():
        ref = m(x, t)
        fast = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t)
        assert torch.allclose(ref, fast, atol=1e-5)
        m.autocast_dtype = torch.bfloat16  # the model runs its forward under autocast
        half = m(x, t)
    assert half.dtype == torch.float32  # returned in the input's dtype
    assert (half - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3
