"""Interfaces for workflow engines (:mod:`itk_gradicon.interfaces.nipype`)."""
