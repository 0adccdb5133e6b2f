"""`kdpipe plan`: model shapes, devices and the memory/time estimate of a run."""
