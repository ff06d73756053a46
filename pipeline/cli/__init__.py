"""The ``dreamshard`` command line: argument helpers and one module per command group."""
