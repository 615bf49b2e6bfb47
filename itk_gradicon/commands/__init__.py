"""What each command runs, as library functions: one ``gradicon register`` (:mod:`.register`: read and check
the files, pre-align, register, write every output in one transaction), a cohort (:mod:`.batch`), the file
commands from files to files (:mod:`.files`: ``apply-transform``, ``warp-labels``, ``jacobian``, ``evaluate``)
and point sets (:mod:`.points`). The click commands of :mod:`itk_gradicon.cli` call these."""
