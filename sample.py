"""Sample videos from a released CogVideoX folder or a vdm training run.

    python sample.py pretrained=/models/CogVideoX-2b prompts='["a panda playing guitar"]'   # no training needed
    python sample.py prompts='["a red square moving right"]'                                 # the latest run
    python sample.py prompts='["a red square moving right", "a red square moving down"]' control=[base,kv_sharing]
    python sample.py prompts_file=prompts.txt                                       # a video per line (" | " joins prompts)
    python sample.py mode=edit prompts='["a red square moving right", "a blue square moving right"]'
    python sample.py mode=reweight prompts='["a red square moving right"]' reweight_token_idx=2 reweight_scale=3
    python sample.py prompts_file=prompts.txt output_dir=out resume=true        # finish an interrupted job
    torchrun --nproc_per_node 4 sample.py prompts_file=prompts.txt              # or: accelerate launch --num_processes 4
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vdm.config_schema import ConfigError, check_command_line
from vdm.distributed import ProcessFailed, close_processes, init_processes
from vdm.errors import UserError
from vdm.sampling import sample
from vdm.sampling.case_file import explicit_keys


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # the keys given on the command line win over a case file's (prompts_file=<case>.yaml)
    explicit = frozenset(explicit_keys(HydraConfig.get().overrides.task))
    processes = init_processes(cfg.device)  # several under torchrun / accelerate launch
    if not processes.is_main:  # rank 0 logs and reports
        logging.getLogger().setLevel(logging.WARNING)
    try:
        out = sample(cfg, explicit, processes)
    except UserError as err:  # anything else is a bug: its traceback stays
        if processes.is_main:  # every process refuses alike
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ProcessFailed as err:
        print(f"error: process {processes.rank}: {err}", file=sys.stderr)
        sys.exit(1)
    finally:
        close_processes(processes)
    if processes.is_main:
        print(out)


if __name__ == "__main__":
    try:  # before Hydra makes any folder: a misspelt key or a wrong value is refused here
        check_command_line("sample", sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
