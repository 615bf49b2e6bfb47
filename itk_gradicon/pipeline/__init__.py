"""The steps of one registration and their options: typed options (:mod:`.options`), intensity
normalisation (:mod:`.preprocess`), the affine pre-alignment (:mod:`.affine`, :mod:`.elastix`), similarities
(:mod:`.losses`), instance optimisation (:mod:`.instance`) and which refinement runs (:mod:`.refinement`)."""
