import pytest
import torch

from vdm.first_stage import PixelShuffleStage


def test_decode_inverts_encode_bitwise():
    stage = PixelShuffleStage(factor=4, in_channels=3)
    x = torch.randn(2, 3, 5, 16, 24)
    z = stage.encode(x)
    assert z.shape == (2, 3 * 16, 5, 4, 6)
    assert torch.equal(stage.decode(z), x)
    assert (stage.latent_channels, stage.spatial_compression, stage.temporal_compression) == (48, 4, 1)
    assert len(list(stage.parameters())) == 0


def test_pixel_lands_in_expected_channel():
    f = 2
    stage = PixelShuffleStage(factor=f, in_channels=3)
    x = torch.zeros(1, 3, 2, 4, 6)
    c, t, h, w = 1, 1, 3, 4  # pixel (h, w) = (1·2 + 1, 2·2 + 0)
    x[0, c, t, h, w] = 7.0
    z = stage.encode(x)
    expected = torch.zeros_like(z)
    expected[0, c * f * f + (h % f) * f + (w % f), t, h // f, w // f] = 7.0
    assert torch.equal(z, expected)


@pytest.mark.parametrize("shape, name", [((1, 3, 2, 10, 16), "height 10"), ((1, 3, 2, 16, 6), "width 6")])
def test_bad_size_names_size_and_factor(shape, name):
    with pytest.raises(ValueError, match=f"{name} is not divisible by factor 4"):
        PixelShuffleStage(factor=4).encode(torch.zeros(shape))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match="in_channels=3"):
        PixelShuffleStage(factor=2).encode(torch.zeros(1, 4, 1, 4, 4))
