"""One module per `parity` subcommand; each defines `register(subparsers)` and sets `handler`."""
