import os
import sys

from jaxembed.cli.train import main

code = main()
if code == 2:
    # Refused (another process trains in this workdir) or invalid settings: nothing was started, so
    # there is nothing to finish. Exit now rather than wait seconds for the libraries' teardown
    # (TensorFlow's native one takes 1-10 s), so a refused second trainer returns at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
