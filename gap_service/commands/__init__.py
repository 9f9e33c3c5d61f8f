"""Subcommands of the gap-service CLI; each module has ``register(subparsers)``."""
