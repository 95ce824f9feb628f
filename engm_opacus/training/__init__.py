"""The training harness: config, loop, checkpoints, runtime, logs, data, models and evaluation.

Nothing here is imported by ``import engm_opacus``; the top-level names ``train``,
``TrainConfig``, ``TrainResult`` and ``evaluate`` load it on first use. Import the modules
directly, e.g. ``from engm_opacus.training.loop import train`` or
``from engm_opacus.training.models import build_model``.
"""
