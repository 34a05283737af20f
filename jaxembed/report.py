"""`python -m jaxembed.report`, a stable path: the command is `jaxembed.cli.report`, the library `jaxembed.eval.report`."""

if __name__ == "__main__":
    import sys

    from jaxembed.cli.report import main

    sys.exit(main())
