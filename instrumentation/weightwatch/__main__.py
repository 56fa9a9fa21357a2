import sys

from weightwatch.cli import main

sys.exit(main())
