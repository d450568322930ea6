import sys

from qmoe.cli import main

sys.exit(main())
