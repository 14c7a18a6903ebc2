"""Side tools, each a module with `main(argv)`: run one as `python -m cmal.tools.NAME --help`."""
