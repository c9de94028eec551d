"""Using and measuring trained runs: inference, metrics and the HTML report."""
