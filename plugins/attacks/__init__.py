"""Built-in nadbench plugins, registered through the `nadbench` entry-point group like any other."""
