"""The training harness: config, loop, checkpoints, runtime, logs, data, models and evaluation.

Nothing here is imported by ``import engm_opacus``; the top-level names ``train``,
``TrainConfig``, ``TrainResult`` and ``evaluate`` load it on first use. Import the modules
directly, e.g. ``from engm_opacus.train.loop import train`` or
``from engm_opacus.train.models import build_model``.

Once any of its modules is imported, Python binds the attribute ``engm_opacus.train`` to this
package (a submodule import sets it on the parent), which would shadow the lazily exported
function ``engm_opacus.train``. So this package is callable: ``engm_opacus.train(config)`` runs
:func:`engm_opacus.train.loop.train` whichever of the two the attribute currently is.
"""

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    """The module type of this package: calling it calls :func:`engm_opacus.train.loop.train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from engm_opacus.train.loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
