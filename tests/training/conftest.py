import pytest

from tests.conftest import TINY_NETWORK
from vdm.build import compose


@pytest.fixture
def train_cfg(tmp_path):
    """A tiny, fast training config writing under tmp_path/runs."""
    def make(*overrides: str):
        return compose(TINY_NETWORK + [
            f"runs_root={tmp_path / 'runs'}", "run_name=test", "batch_size=2", "max_steps=4", "log_every=1",
            "video_every=0", "checkpoint.every=2", "checkpoint.keep=null", "scheduler.warmup_steps=1",
            "sampler.verbose=false", *overrides], config_name="train")
    return make
