"""Experiments on top of the training harness: the ENGM-vs-MSGD benchmark and the gradient diagnostics.

Not imported by ``import engm_opacus``; ``engm-opacus bench`` and ``engm-opacus diagnose`` run them.
"""
