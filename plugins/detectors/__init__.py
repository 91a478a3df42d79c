"""Built-in detectors: of poisoned training data (level "data") and of triggered inputs (level "input")."""
