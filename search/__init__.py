"""ETS tree search against a process reward model, with best-of-N / beam / DVTS / REBASE
baselines (filled by the ETS issue)."""
