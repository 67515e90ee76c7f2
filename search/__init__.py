"""ETS tree search against a process reward model, and best-of-N / beam / DVTS / REBASE baselines (filled by the ETS issue)."""
