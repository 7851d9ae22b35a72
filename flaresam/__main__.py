"""``python -m flaresam`` (and ``torchrun ... -m flaresam finetune``): the same entry point as the ``flaresam`` command."""

from flaresam.cli import main

if __name__ == "__main__":
    main()
