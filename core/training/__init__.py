"""The training core: datasets and subsets (``data``, ``subsets``, ``augment``), the one training loop
and its steps (``train``, ``steps``, ``fused`` for many models at once), the one evaluation
(``evaluate``), models (``models``), attention maps (``attention``) and how a run computes
(``settings``). Imports only the contract; this ``__init__`` imports nothing (every stage key's code
closure passes through it)."""
