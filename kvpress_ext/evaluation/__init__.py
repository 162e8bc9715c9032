"""Library code behind the evaluation scripts: metrics, loops, result writing."""
