"""Pallas kernels: block-sparse flash attention, sparse / paged decode attention, log-sum-exp merge."""
