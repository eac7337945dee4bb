"""Teachers and the pool that serves soft labels (label sources).

Importing the package registers its entries: label sources (`hard`, `pool`, `store`,
`label_smoothing` in `teachers.labeling.LABELERS`), pool weightings and selection strategies.
"""
from teachers import labeling, selection, smoothing, store_labels, weighting  # noqa: F401  (register entries)
from teachers.pool import EnsemblePool
from teachers.query_budget import ActiveQuerySource
from teachers.source import LabelSource, QueryCost, SoftLabels
from teachers.teacher import Teacher, create_teacher

__all__ = ["ActiveQuerySource", "EnsemblePool", "LabelSource", "QueryCost", "SoftLabels", "Teacher", "create_teacher"]
