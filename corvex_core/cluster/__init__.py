"""A core in a cluster (`core.ledger.backend: postgres`): the mirror of the accounts that
admission reads, the leases it spends from, charges on their way to PostgreSQL, and the tasks
that keep all of it fresh (docs/deploy-cluster.md). A single core knows its types (metering
and serving name them) but never makes one of its objects."""
