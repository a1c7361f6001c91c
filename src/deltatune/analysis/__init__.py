"""Looking inside deltas (spectra, intruder dimensions, comparisons) and a searchable store of adapters."""
