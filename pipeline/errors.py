"""The errors every part of the pipeline may raise; importing this imports nothing else of the
pipeline, so the eval library, judges and tracking can raise them without depending on stages."""


class StageError(RuntimeError):
    """A stage failed for a reason the user can act on; the driver prints it as one line."""


class StagePreempted(StageError):
    """The stage stopped early on purpose (preemption signal) after saving its progress in
    ``work_dir``; rerunning the same command resumes it. The driver exits 0 without marking the
    stage complete, so a batch system's requeue, not a failure, follows."""
