"""Built-in specs (installed as `lincompile.specs`, YAML files as package data)."""
