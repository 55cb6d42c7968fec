"""Tiny model configs shared by tests (small enough for milliseconds on a CPU)."""

# A CogVideoX 3D causal VAE with spatial compression 4 and temporal compression 4.
TINY_VAE_CONFIG = dict(
    down_block_types=["CogVideoXDownBlock3D"] * 3,
    up_block_types=["CogVideoXUpBlock3D"] * 3,
    block_out_channels=[8, 8, 8],
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    temporal_compression_ratio=4,
    sample_height=64,  # tiling engages only above half this size: tests run untiled 16x16 clips
    sample_width=64,
)
