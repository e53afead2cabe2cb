import sys

from shed.cli import main

sys.exit(main())
