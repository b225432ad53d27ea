import sys

from fmtl_server.cli import main

sys.exit(main())
