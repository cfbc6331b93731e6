"""Speed and memory measurements: the benchmark, its rows and whole runs, profiles, the loader rate, the ceiling."""
