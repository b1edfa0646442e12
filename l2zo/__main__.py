import sys

from l2zo.cli.main import main

sys.exit(main())
