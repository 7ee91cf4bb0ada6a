"""Layer 6: the tasks behind the entry points (train, eval, analyze, report, export) and the checks of their
configs: the only code that reads a DictConfig."""
