"""Chapter logic: one module per chapter of the book.

Each module holds what its notebook would otherwise compute in cells: the
parameter checks, the runs returning tidy tables, and the functions turning
those tables into every value and sentence that the prose glues. The core
modules of the package never import this subpackage.

Modules
-------
audit_calibration
    Chapter 05, "Can the audit be trusted?": size and power of the audit's
    tests on scenarios with a known truth, the false-claim rate of the outcome
    classes, and the placebo self-calibration.
"""
