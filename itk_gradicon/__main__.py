"""``python -m itk_gradicon``: the ``gradicon`` command."""

from .cli import run

if __name__ == "__main__":
    run()
