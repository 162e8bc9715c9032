"""Reports: the records of a runner as markdown tables, JSON summaries and plots (the perplexity sweep's are in
:mod:`kvpress_ext.evaluation.results`)."""
