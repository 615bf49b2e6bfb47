"""Physical space: the network's frames (:mod:`.frames`), displacement fields and the transform files
written from them (:mod:`.transforms`), resampling (:mod:`.resample`) and Jacobian determinants (:mod:`.jacobian`)."""
