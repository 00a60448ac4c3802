"""Jobs: the spec, the plan, execution on Dask, and the CLI."""
