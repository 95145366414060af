"""The errors every part of the pipeline may raise; this module imports nothing of the pipeline."""


class StageError(RuntimeError):
    """A stage failed for a reason the user can act on; the driver prints it as one line."""


class StagePreempted(StageError):
    """Stopped on purpose (preemption) after saving progress in ``work_dir``: the driver exits 0 without
    completing the stage, so a batch system requeues the job and the rerun resumes."""
