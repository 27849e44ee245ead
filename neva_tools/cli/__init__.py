"""The ``neva`` command line: one thin module per subcommand."""
