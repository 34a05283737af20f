"""`python -m jaxembed.convert_weights`, a stable path: the command is `jaxembed.cli.convert_weights`, the library `jaxembed.models.convert_weights`."""

if __name__ == "__main__":
    import sys

    from jaxembed.cli.convert_weights import main

    sys.exit(main())
