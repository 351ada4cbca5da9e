import sys

from mlstore.cli import main

sys.exit(main())
