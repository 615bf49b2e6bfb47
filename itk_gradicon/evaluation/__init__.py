"""Judging a registration: overlap, surface distances and landmark errors (:mod:`.metrics`), the QC picture
(:mod:`.qc`) and the provenance record of ``--out-json`` (:mod:`.provenance`)."""
