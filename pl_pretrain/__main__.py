"""``python -m pl_pretrain``: the same as the ``pl-pretrain`` command."""

import sys

from pl_pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
