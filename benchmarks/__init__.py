"""Corvex benchmarks: a load generator, the ceilings that bound it, and the scenarios of
`make bench`, which measure the real processes as users run them and write what they find to
`benchmarks/results/`. Nothing here is imported by the core or the edge."""
