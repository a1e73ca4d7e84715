"""parity's harness: zoo, suites, sweeps, metrics, reports and the gate."""
