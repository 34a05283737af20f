"""`python -m jaxembed.cluster`, a stable path: the command is `jaxembed.cli.cluster`, the library `jaxembed.search.cluster`."""

if __name__ == "__main__":
    import sys

    from jaxembed.cli.cluster import main

    sys.exit(main())
