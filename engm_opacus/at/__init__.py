"""The adversarial-training layer: PGD attack, AT losses (mean-reduced), and the one-step helper.

Works with any model and any ``torch.optim`` optimizer (MSGD or ENGM from ``make_engm``); it
never imports the ENGM core (``optim``, ``per_example``, ``wrap``). Per step:

.. math::

    x^{adv} = \\mathrm{PGD}(x),\\quad L = \\frac{1}{B}\\sum_i l(f(x_i), f(x^{adv}_i), y_i),\\quad
    L.\\mathrm{backward}();\\ \\mathrm{optimizer.step}()
"""

from engm_opacus.at import losses
from engm_opacus.at.attacks import attack_mode, pgd_linf, project, validate_attack, validate_threat_model
from engm_opacus.at.losses import *  # noqa: F401,F403  (the loss adapters, listed in losses.__all__)
from engm_opacus.at.step import StepMetrics, count_correct, train_step

__all__ = [
    *losses.__all__,
    "StepMetrics",
    "attack_mode",
    "count_correct",
    "pgd_linf",
    "project",
    "train_step",
    "validate_attack",
    "validate_threat_model",
]
