import sys

from jaxembed.train.cli import main

sys.exit(main())
