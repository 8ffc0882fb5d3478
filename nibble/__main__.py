import sys

from nibble.cli import main

sys.exit(main())
