import pytest

from longgen.backbones import FrameLayout


def test_causal_layout_round_trip_and_error_names_valid_counts():
    layout = FrameLayout(temporal_compression=4, causal=True)
    assert layout.num_latent_frames(81) == 21
    assert layout.num_pixel_frames(21) == 81
    with pytest.raises(ValueError, match=r"4k\+1.*77 or 81"):
        layout.num_latent_frames(80, "wan")


def test_per_frame_layout():
    layout = FrameLayout(temporal_compression=1, causal=False)
    assert layout.num_latent_frames(16) == 16 and layout.num_pixel_frames(16) == 16
    with pytest.raises(ValueError, match="positive"):
        layout.num_latent_frames(0)
