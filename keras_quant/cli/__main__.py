"""`python -m keras_quant.cli ...`: the same as the `keras-quant` console script."""

import sys

from keras_quant.cli import main

if __name__ == "__main__":
    sys.exit(main())
