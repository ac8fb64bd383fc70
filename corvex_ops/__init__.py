"""Operating Corvex: launching the core and edge as processes, the admin client and its CLI,
and `corvex serve`. It sits above the core and the edge (it starts them) and below the
benchmarks and the command, which use it."""
