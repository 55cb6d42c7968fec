"""Sample videos from a released CogVideoX folder or a vdm training run.

    python sample.py pretrained=/models/CogVideoX-2b prompts='["a panda playing guitar"]'   # no training needed
    python sample.py prompts='["a red square moving right"]'                                 # the latest run
    python sample.py prompts='["a red square moving right", "a red square moving down"]' adaln=[base,kv_sharing]
    python sample.py prompts_file=prompts.txt                                       # a video per line (" | " joins prompts)
    python sample.py mode=edit prompts='["a red square moving right", "a blue square moving right"]'
    python sample.py mode=reweight prompts='["a red square moving right"]' reweight_token_idx=2 reweight_scale=3
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vdm.config_schema import ConfigError, check_command_line
from vdm.sampling import sample
from vdm.sampling.case_file import explicit_keys


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # the keys given on the command line win over a case file's (prompts_file=<case>.yaml)
    explicit = frozenset(explicit_keys(HydraConfig.get().overrides.task))
    try:
        out = sample(cfg, explicit)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    try:  # before Hydra makes any folder: a misspelt key or a wrong value is refused here
        check_command_line("sample", sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
