"""deltatune benchmarks: `python -m bench [NAME ...] [--quick]`. Each reports ratios against an anchor run in the
same process, never absolute pass/fail timings."""
