"""``python -m itk_gradicon``: the ``gradicon`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="gradicon")
