"""`python -m jaxembed.embed`, a stable path: the command is `jaxembed.cli.embed`, the library `jaxembed.inference.embed`."""

if __name__ == "__main__":
    import sys

    from jaxembed.cli.embed import main

    sys.exit(main())
