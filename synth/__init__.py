"""Dataset condensation: synthesis methods, flip-aware matching (FYI), label projectors (HeLlO).

Importing the package registers its entries: synthesis methods (`synth.methods.SYNTH_METHODS`)
and the label sources `relabel` and `projector` (`teachers.labeling.LABELERS`).
"""
from synth import bn_matching, distribution_matching, gradient_matching, hello, relabel  # noqa: F401  (register)
