"""Training: the epoch loop (checkpoints, exact resume), schedules, devices and threads, data parallelism, subnormal
floats, and counting host-device syncs. Import the modules themselves (``pipeline.training.loop``, ...): this
package imports nothing, so the transforms can use ``host_syncs`` without loading the loop."""
