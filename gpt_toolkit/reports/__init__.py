"""Reports of runs: the experiments table and loss plots. Imports the other rooms, and nothing imports it."""
