"""Subcommands of ``engm-opacus``, one module each (see :mod:`engm_opacus.cli` for the protocol)."""
