"""Loss weights w(a) applied to the x0-space error ‖D(x_t) − x0‖² (SPEC §3).

Since D − x0 = sqrt(1−a²)·(v − F) for a v-predicting network, w = 1/(1−a²) turns the x0-MSE into the
v-MSE and w = a²/(1−a²) (the SNR) into the eps-MSE.
"""

import torch


class VWeighting:
    def __call__(self, alpha_cumprod_sqrt: torch.Tensor) -> torch.Tensor:
        return 1 / (1 - alpha_cumprod_sqrt**2)


class EpsWeighting:
    def __call__(self, alpha_cumprod_sqrt: torch.Tensor) -> torch.Tensor:
        a2 = alpha_cumprod_sqrt**2
        return a2 / (1 - a2)


class UnitWeighting:
    def __call__(self, alpha_cumprod_sqrt: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(alpha_cumprod_sqrt)
