"""Train a video diffusion model: `python train.py [network=dit] [lora_train=true] [key=value ...]`.

Multi-GPU: `accelerate launch --config_file conf/accelerate/ddp.yaml train.py ...`.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vdm.config_schema import ConfigError, check_command_line
from vdm.errors import UserError
from vdm.training.loop import train

log = logging.getLogger("vdm.train")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        final = train(cfg, run_dir)
    except UserError as err:  # anything else is a bug: its traceback stays
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    log.info("done: %s", final)


if __name__ == "__main__":
    try:  # before Hydra makes any folder: a misspelt key or a wrong value is refused here
        check_command_line("train", sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
