"""Compression: distillation, reparameterization for deployment; pruning and QAT to come.

* :mod:`edgemt.compress.distill`: teacher-to-student distillation terms and the
  :class:`~edgemt.compress.distill.Distiller` module the trainer optimises.
* :mod:`edgemt.compress.reparam`: :func:`reparameterize` (deploy forms of the
  low-rank expert blocks, BatchNorm folding) and :func:`calibrate_gates`.
"""

from edgemt.compress.reparam import FORMS, calibrate_gates, freeze_gates, reparameterize

__all__ = ["FORMS", "calibrate_gates", "freeze_gates", "reparameterize"]
