"""Atomic writes leave files and folders with the permissions an ordinary write would: the user's umask."""

import os
import stat

import numpy as np
import pytest

from vdm.atomic import atomic_path
from vdm.data.video_io import write_mp4
from vdm.networks import DiffusionTransformer


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask):
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert mode(tmp_path / "a.txt") == 0o666 & ~umask
    write_mp4(tmp_path / "v.mp4", np.zeros((1, 8, 8, 3), np.uint8))
    assert mode(tmp_path / "v.mp4") == 0o666 & ~umask
    folder = DiffusionTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=1, time_embed_dim=16,
                                  text_embed_dim=8, in_channels=4, out_channels=4, sample_width=4, sample_height=4,
                                  sample_frames=5).save_pretrained(tmp_path / "net")
    assert mode(folder) == 0o777 & ~umask
    assert mode(folder / "config.json") == 0o666 & ~umask
