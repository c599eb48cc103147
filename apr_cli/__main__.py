"""`python -m apr_cli` runs the `apr` command line."""

from apr_cli.cli import main

main()
