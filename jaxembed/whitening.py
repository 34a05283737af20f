"""`python -m jaxembed.whitening`, a stable path: the command is `jaxembed.cli.whitening`, the library `jaxembed.inference.whitening`."""

if __name__ == "__main__":
    import sys

    from jaxembed.cli.whitening import main

    sys.exit(main())
