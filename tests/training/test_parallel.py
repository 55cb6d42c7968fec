"""Choosing and checking the parallelism: `fsdp=true` or an Accelerate FSDP launch config, and the FSDP
options vdm refuses. (Training under FSDP itself: test_fsdp.)"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from vdm.training.parallel import DataParallel, FullyShardedDataParallel, check_fsdp, make_parallel

ROOT = Path(__file__).resolve().parents[2]


def accelerator(distributed_type, processes: int, plugin=None) -> SimpleNamespace:
    """What make_parallel reads of an Accelerator (Accelerate enters its FSDP mode only on GPUs)."""
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(fsdp_plugin=plugin),
                           num_processes=processes, process_index=0, device=torch.device("cpu"),
                           is_main_process=True)


def launch_env(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file <file>` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config_file),
                                                                             "train.py"]))
    return prepare_multi_gpu_env(args)


def test_the_shipped_fsdp_launch_config_is_accepted(monkeypatch):
    for key, value in launch_env(ROOT / "conf" / "accelerate" / "fsdp.yaml").items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # as Accelerator() builds it from that environment
    parallel = make_parallel(accelerator(DistributedType.FSDP, 8, plugin), fsdp=False, mixed_precision="bf16",
                             compile_model=False)
    assert type(parallel) is FullyShardedDataParallel and parallel.reshard_after_forward


def test_fsdp_is_chosen_by_the_key_or_the_launch_config():
    assert type(make_parallel(accelerator(DistributedType.MULTI_GPU, 2), False, "no", False)) is DataParallel
    assert type(make_parallel(accelerator(DistributedType.MULTI_CPU, 2), True, "no", False)) is FullyShardedDataParallel
    assert type(make_parallel(accelerator(DistributedType.NO, 1), True, "no", False)) is DataParallel  # nothing to shard


@pytest.mark.parametrize("options, message", [
    (dict(fsdp_version=1), "fsdp_version=1 in the accelerate config: vdm shards with FSDP2"),
    (dict(cpu_offload=True), "fsdp_offload_params=true in the accelerate config is not supported"),
    (dict(activation_checkpointing=True), "fsdp_activation_checkpointing=true in the accelerate config is not "
                                          "supported; set it to false and use network.gradient_checkpointing=true"),
    (dict(cpu_ram_efficient_loading=True), "fsdp_cpu_ram_efficient_loading=true in the accelerate config is not "
                                           "supported"),
])
def test_accelerate_fsdp_options_vdm_cannot_honour_are_refused(options, message, monkeypatch):
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "False")  # the plugin writes it: undone after the test
    plugin = FullyShardedDataParallelPlugin(**{"fsdp_version": 2, **options})
    with pytest.raises(ValueError, match=message):
        check_fsdp("bf16", False, plugin)


def test_accelerate_fsdp_config_sets_resharding():
    assert check_fsdp("bf16", False, FullyShardedDataParallelPlugin(fsdp_version=2)) is True
    assert check_fsdp("bf16", False, FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=False)) is False
