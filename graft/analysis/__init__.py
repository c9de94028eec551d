"""Looking at networks and strategies: diagnostics and the scratch-vs-probe-vs-finetune comparison."""
