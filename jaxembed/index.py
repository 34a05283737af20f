"""`python -m jaxembed.index`, a stable path: the command is `jaxembed.cli.index`, the library `jaxembed.search.index`."""

if __name__ == "__main__":
    import sys

    from jaxembed.cli.index import main

    sys.exit(main())
