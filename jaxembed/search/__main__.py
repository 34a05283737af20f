import sys

from jaxembed.cli.search import main

sys.exit(main())
