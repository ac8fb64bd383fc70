"""The cluster ledger in PostgreSQL: schema migrations, credit and token leases, accounts.

This package is the shared authority for money when several cores spend one workspace
(DESIGN.md "Scale"). It never holds money state in memory: every function here is one
transaction against the database, and the database's constraints are the last word.
"""
