"""Evaluation metrics following the MLoRE / InvPT / ATRC protocol.

Every meter accumulates over a whole split (``update`` per batch, ``compute``
at the end, ``reset`` to start over) and accepts activated predictions
(:func:`edgemt.tasks.activate`) as torch tensors or numpy arrays in the label
layouts of :mod:`edgemt.tasks`. Percentages are in 0-100.

* :class:`SegmentationMeter` - mIoU / pixel accuracy (semseg, human_parts)
* :class:`DepthMeter` - pooled RMSE, abs-rel, log-RMSE
* :class:`NormalsMeter` - mean / median / RMSE angular error, % within 11.25/22.5/30
* :class:`SaliencyMeter` - maxF (beta^2 = 0.3)
* :class:`BoundaryMeter` - ODS F, Python protocol (approximates MATLAB SEISM)
* :class:`MultiTaskEvaluator`, :func:`make_meter`, :func:`delta_m`
"""

from edgemt.metrics.boundary import BoundaryMeter, boundary_counts, boundary_f, edge_nms
from edgemt.metrics.depth import DepthMeter
from edgemt.metrics.multitask import MultiTaskEvaluator, delta_m, make_meter
from edgemt.metrics.normals import NormalsMeter
from edgemt.metrics.saliency import SaliencyMeter
from edgemt.metrics.segmentation import SegmentationMeter

__all__ = [
    "SegmentationMeter",
    "DepthMeter",
    "NormalsMeter",
    "SaliencyMeter",
    "BoundaryMeter",
    "MultiTaskEvaluator",
    "make_meter",
    "delta_m",
    "boundary_f",
    "boundary_counts",
    "edge_nms",
]
