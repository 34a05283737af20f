"""`python -m jaxembed.evaluate`, a stable path: the command is `jaxembed.cli.evaluate`, the library `jaxembed.eval.evaluate`."""

if __name__ == "__main__":
    import sys

    from jaxembed.cli.evaluate import main

    sys.exit(main())
