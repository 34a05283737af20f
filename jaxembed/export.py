"""`python -m jaxembed.export`, a stable path: the command is `jaxembed.cli.export`, the library `jaxembed.inference.export`."""

if __name__ == "__main__":
    import sys

    from jaxembed.cli.export import main

    sys.exit(main())
