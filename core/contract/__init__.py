"""The plugin contract: what an attack, defense, model or dataset plugin implements and declares
(``api``), its typed configs (``config``), the hooks it registers through (``hookspecs``) and its
sources (``sources``). Imports nothing above it; this ``__init__`` imports nothing (every stage key's
code closure passes through it)."""
