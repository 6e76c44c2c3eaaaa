import sys

from cherry_train.cli import main

sys.exit(main())
