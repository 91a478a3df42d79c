"""What a user runs: the ``bench`` CLI (``cli``; its shared options and one error path in
``options``), tables and leaderboards from tracked runs (``tables``), the report page (``report``),
``bench attack`` and ``bench defend`` on the practitioner's own files
(``practitioner``, reading and writing them in ``userfiles``) and the fidelity table (``fidelity``).
Nothing below imports these."""
