import sys

from fastres.cli import main

sys.exit(main())
