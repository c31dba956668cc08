"""Chapter logic: one module per chapter of the book.

Each module holds what its notebook would otherwise compute in cells: the
runs returning tidy tables, and the functions turning those tables into every
value and sentence that the prose glues (each branch unit-tested on
constructed tables). The core modules of the package never import this
subpackage; :mod:`mbe_helpers.book` reads :mod:`.params` to check a chapter's
parameters before a kernel starts.

Modules
-------
params
    One pydantic parameter schema per chapter and the one-sentence check.
acid_test
    Chapter 01: capacity and label-noise probes, the acid-test verdict.
grid
    Chapter 02: the replication of the original study, the heterogeneous
    grid under the calibrated audit, its placebos and disagreements.
credit_calibration
    Chapter 03: credit signals placed between a positive and a negative control.
fa_diagnostics
    Chapter 04: the four feedback-alignment diagnostics over methods and seeds.
audit_calibration
    Chapter 05, "Can the audit be trusted?": size and power of the audit's
    tests on scenarios with a known truth, the false-claim rate of the outcome
    classes, and the placebo self-calibration.
prose
    Glue that also lists the glued values for readers in JupyterLab.
"""
