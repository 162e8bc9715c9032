"""Runners: one per evaluation, each the same shape. Plan the cells (plain parameters), run them through
:func:`kvpress_ext.evaluation.sweep.run_sweep` (local or Ray, one JSON per cell, finished cells reused) with a cell
function that takes its model from :mod:`kvpress_ext.evaluation.model_cache`, and hand the records to a report."""
