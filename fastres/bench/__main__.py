import sys

from fastres.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
