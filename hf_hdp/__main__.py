"""``python -m hf_hdp ...`` runs the ``hf-hdp`` command line."""

import sys

from hf_hdp.cli import main

if __name__ == "__main__":
    sys.exit(main())
