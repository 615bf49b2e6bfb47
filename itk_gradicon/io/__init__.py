"""Files in and out: image and transform files, grids, all-or-nothing outputs, tables, and the one bridge
to ITK Python (:mod:`.itk_bridge`). Inside the package images are ``SimpleITK.Image`` objects."""
