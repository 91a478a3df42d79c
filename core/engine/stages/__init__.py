"""The stages of a cell as plain functions, one module per stage: poison, train, defend (which also
evaluates and runs the reactivation check).

A stage's stored output is keyed by its inputs' content and by the code closure of its module
(:mod:`nadbench.engine.codehash`): what the stage function does and everything it calls, its wiring included
(which training step and epochs a model gets, how it is seeded, what a defense may reach). The driver
(:mod:`nadbench.engine`) only plans, caches, schedules and records, so an edit to it, to the CLI, to
tracking or to tables changes no key, and an edit to a stage changes the keys of that stage and of
the stages that take its output. This package's ``__init__`` imports nothing: every stage's closure
passes through it.
"""
