"""The lab: topologies of real processes, load, faults and the benchmark."""
