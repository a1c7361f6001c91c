"""Looking inside deltas (spectra, intruder dimensions, comparisons) and a searchable store of adapters.

Python API (every function returns plain dicts / lists, JSON-ready):
- `analysis.inspect.inspect(source, base)`, `analysis.inspect.compare(a, b, base)`: per-layer spectra, ranks,
  intruder dimensions; cosine / subspace overlap between two adapters or an adapter and a fine-tuned model.
- `analysis.dsire`: dataset-size estimates from a calibration set (`calibrate`, `predict`, `train_calibration_set`).
- `analysis.store.AdapterStore`: add / list / search / show / remove / export, access groups.
- `analysis.routing.routed(store, model, text, groups=..., base_model=...)`: Arrow or description routing, composed
  for the input (a context manager around any forward / generate call); `analysis.compose.weighted` for explicit
  weights; `analysis.library.compose_into_store` for stored compositions; `analysis.mbc.cluster` for MBC.
- `analysis.report`: PNG figures and a self-contained HTML report.
"""
